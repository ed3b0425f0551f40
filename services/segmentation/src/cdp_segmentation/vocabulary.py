"""What a definition may name, learnt from ingest's schemas, and the type check against it.

Profile attributes are the fields of profile-class schemas (and ``consent_<action>`` for each
field a schema marks ``consent_for``); event fields those of event-class schemas (nested objects
as dotted paths), per event type: a field of ``order`` (``sum(order.amount)``, ``order where
channel = "store"``) is typed by the schemas that list ``order`` in their ``event_types``, over
those that list no event types (whose fields apply to any type). Two schemas listing one event
type with different types for a field make a condition on that field an error naming both.

A field no schema declares is refused with the nearest declared names; a literal of the wrong
kind (``age > "abc"``) is refused with the field's type. While segmentation knows no schema of a
class (e.g. before ingest's config log is read), names of that class are not checked.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lark import Token, Tree

from cdp.ingest.v1 import ingest_pb2
from cdp_kit.consent import attribute_of
from cdp_segmentation.language import LanguageError

NUMERIC = {"integer", "number"}
STRINGY = {"string", "date", "timestamp"}
EXAMPLES = {
    "integer": "30",
    "number": "30",
    "boolean": "true",
    "date": '"2024-01-31"',
    "timestamp": '"2024-01-31T10:00Z"',
}


def flatten(fields: Iterable[ingest_pb2.Field], prefix: str = "") -> dict[str, str]:
    """{dotted path: type} of a schema's fields; an object without declared fields is open ("object*")."""
    out: dict[str, str] = {}
    for f in fields:
        path = f"{prefix}{f.name}"
        kind = ingest_pb2.FieldType.Name(f.type).removeprefix("FIELD_TYPE_").lower()
        out[path] = "object*" if kind == "object" and not f.fields else kind
        out.update(flatten(f.fields, f"{path}."))
    return out


def consent_attributes(fields: Iterable[ingest_pb2.Field]) -> dict[str, str]:
    """The canonical consent attributes ingest writes for a schema's ``consent_for`` fields."""
    return {attribute_of(f.consent_for): "string" for f in fields if f.consent_for}


@dataclass(frozen=True)
class EventSchema:
    name: str
    fields: Mapping[str, str]
    # Empty: the schema's fields apply to any event type.
    event_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class EventVocabulary:
    """Event fields per event type, from the event schemas segmentation knows."""

    schemas: tuple[EventSchema, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.schemas)

    def fields_of(self, event_type: str) -> dict[str, str]:
        """{path: type} of an event type's fields; a path two of its schemas type differently is
        ``conflict:<who says what>``."""
        out: dict[str, str] = {}
        for schema in self.schemas:
            if not schema.event_types:
                out.update(schema.fields)
        said: dict[str, dict[str, list[str]]] = {}
        for schema in self.schemas:
            if event_type in schema.event_types:
                for path, kind in schema.fields.items():
                    said.setdefault(path, {}).setdefault(kind, []).append(schema.name)
        for path, kinds in said.items():
            out[path] = _agreed(kinds)
        return out

    def declares(self, event_type: str) -> bool:
        """Whether any schema's fields apply to this event type."""
        return any(not s.event_types or event_type in s.event_types for s in self.schemas)


def _agreed(kinds: Mapping[str, list[str]]) -> str:
    if len(kinds) == 1:
        return next(iter(kinds))
    if set(kinds) <= NUMERIC:
        return "number"
    said = "; ".join(f"{_a(kind)} in {', '.join(names)}" for kind, names in sorted(kinds.items()))
    return f"conflict:{said}"


@dataclass(frozen=True)
class Vocabulary:
    attributes: Mapping[str, str] = field(default_factory=dict)
    events: EventVocabulary = field(default_factory=EventVocabulary)
    # Computed attributes by name: "number", or the field's type for most_recent ("any" when unknown).
    computed: Mapping[str, str] = field(default_factory=dict)

    def check(self, tree: Tree[Token]) -> None:
        """Raise LanguageError at the first unknown field or mistyped literal."""
        _visit(tree, self, event=None)


def _visit(tree: Tree[Token] | Token | None, vocab: Vocabulary, *, event: str | None) -> None:
    """``event``: the event type whose fields the names are (None: profile attributes)."""
    if not isinstance(tree, Tree):
        return
    rule = tree.data
    if rule == "comparison":
        _comparison(tree, vocab, event=event)
        return
    if rule in ("exists", "not_exists"):
        _known(tree.children[0], vocab, event=event)
        return
    if rule in ("event_condition", "computed_def"):
        agg, path = tree.children[0], tree.children[1]
        event_type, _, field_name = str(path).partition(".")
        if field_name and vocab.events:
            token = _shifted(path, len(str(path)) - len(field_name))
            kind = _known(token, vocab, event=event_type)
            if kind is not None and kind not in NUMERIC and str(agg) != "most_recent":
                hint = f"{agg}(…) needs a numeric event field; {field_name} is {_a(kind)} in {event_type} events"
                raise LanguageError(token, "type", hint)
        _visit(tree.children[2], vocab, event=event_type)
        return
    if rule == "pattern":
        if len(tree.children) == 2:
            _visit(tree.children[1], vocab, event=str(tree.children[0]))
        return
    if rule in ("has_identity", "consent", "member_of"):
        return
    for child in tree.children:
        _visit(child, vocab, event=event)


def _shifted(token: Token, by: int) -> Token:
    """The part of a token after ``by`` characters, with its column."""
    moved = Token(token.type, str(token)[by:], token.start_pos, token.line, token.column)
    if moved.column is not None:
        moved.column += by
    return moved


def _known(path: Token, vocab: Vocabulary, *, event: str | None) -> str | None:
    """The declared type of a path, or None when this kind of name is not checked."""
    if event is None and str(path) in vocab.computed:
        kind = vocab.computed[str(path)]
        return None if kind == "any" else kind
    if event is not None and not vocab.events:
        return None
    names = vocab.events.fields_of(event) if event is not None else vocab.attributes
    text = str(path)
    if event is not None and not vocab.events.declares(event):
        hint = f"no event schema declares the event type {event!r}, so it has no field {text!r}"
        raise LanguageError(path, "field", hint)
    if not names:
        return None
    if text in names:
        kind = names[text]
        if kind.startswith("conflict:"):
            hint = f"schemas declaring {event} disagree on the type of {text}: {kind.removeprefix('conflict:')}"
            raise LanguageError(path, "type", hint)
        return kind
    parts = text.split(".")
    for i in range(len(parts) - 1, 0, -1):  # inside an open object anything goes
        if names.get(".".join(parts[:i])) == "object*":
            return None
    near = difflib.get_close_matches(text, list(names), n=3, cutoff=0.6)
    where = "event field" if event is not None else "profile attribute"
    if near:
        hint = f"no schema declares the {where} {text!r}; did you mean {', '.join(near)}?"
    else:
        hint = f"no schema declares the {where} {text!r}; declared: {', '.join(sorted(names)[:12])}"
    if event is not None:
        hint += f" (fields of {event} events)"
    raise LanguageError(path, "field", hint)


def _comparison(tree: Tree[Token], vocab: Vocabulary, *, event: str | None) -> None:
    path = tree.children[0]
    assert isinstance(path, Token)
    kind = _known(path, vocab, event=event)
    if kind is None or kind.startswith("object"):
        return
    if len(tree.children) == 2:  # path in [...]
        op, values = "in", tree.children[1]
        literals = list(values.children) if isinstance(values, Tree) else []
    else:
        op, literals = str(tree.children[1]), [tree.children[2]]
    for literal in literals:
        if isinstance(literal, Tree):
            _literal_fits(path, kind, op, literal)


def _literal_fits(path: Token, kind: str, op: str, literal: Tree[Token]) -> None:
    given = {"string": "string", "number": "number", "true": "boolean", "false": "boolean"}.get(str(literal.data))
    if given is None:
        return
    if op == "contains" and kind == "array":
        return
    fits = (
        (given == "number" and kind in NUMERIC)
        or (given == "string" and kind in STRINGY)
        or (given == "boolean" and kind == "boolean")
        or (kind == "array" and op in ("contains",))
    )
    if fits:
        return
    example = {
        "integer": "30",
        "number": "30",
        "boolean": "true",
        "date": '"2024-01-31"',
        "timestamp": '"2024-01-31T10:00:00Z"',
    }
    sample = example.get(kind, '"text"')
    shown = "in [...]" if op == "in" else op
    raise LanguageError(
        _literal_token(literal) or path,
        "type",
        f"{path} is {_a(kind)}, not {_a(given)}: compare it with {_a(kind)}, e.g. {path} {shown} {sample}",
    )


def _literal_token(literal: Tree[Token]) -> Token | None:
    for child in literal.children:
        if isinstance(child, Token):
            return child
    return None


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"
