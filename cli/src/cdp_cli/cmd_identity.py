"""``cdp identity …``: namespaces, the graph of an identity, unlinks and drop counts.

The ``identity`` group: namespaces, resolve, graph, unlink and stats.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from cdp.identity.v1 import identity_pb2
from cdp.identity.v1 import identity_pb2 as pb
from cdp_cli import inputs, render
from cdp_cli.context import JsonFlag, client_of, group

namespace_app = typer.Typer(
    help="Identity namespaces (standard and custom).", no_args_is_help=True, add_completion=False
)
NamespaceKind = Literal["email", "phone", "cross_device", "cookie", "device", "hashed", "custom"]
TYPES: dict[NamespaceKind, pb.NamespaceType.ValueType] = {
    "email": pb.NAMESPACE_TYPE_EMAIL,
    "phone": pb.NAMESPACE_TYPE_PHONE,
    "cross_device": pb.NAMESPACE_TYPE_CROSS_DEVICE,
    "cookie": pb.NAMESPACE_TYPE_COOKIE,
    "device": pb.NAMESPACE_TYPE_DEVICE,
    "hashed": pb.NAMESPACE_TYPE_HASHED,
    "custom": pb.NAMESPACE_TYPE_CUSTOM,
}


_client = client_of


def _type_label(value: int) -> str:
    return render.enum_label(pb.NamespaceType.Name(value), "NAMESPACE_TYPE_")  # type: ignore[arg-type]


@namespace_app.command("create")
def namespace_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="lower_snake_case name, e.g. member_no.")],
    type_: Annotated[
        NamespaceKind, typer.Option("--type", help="How its values are normalised and matched.")
    ] = "custom",
    unique: Annotated[bool, typer.Option("--unique", help="A graph holds at most one value of it.")] = False,
    priority: Annotated[int, typer.Option("--priority", help="Lower is stronger (standard: 10-90); 0 = 100.")] = 0,
    description: Annotated[str, typer.Option("--description", help="What it identifies.")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Create a custom identity namespace.

    Example: cdp identity namespace create member_no --type cross_device --unique --priority 5
    """
    client = _client(ctx)
    request = pb.CreateNamespaceRequest(
        name=name, type=TYPES[type_], unique=unique, priority=priority, description=description
    )
    reply = client.identity.CreateNamespace(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.success(f"namespace {reply.name} created ({_type_label(reply.type)}, priority {reply.priority})")


@namespace_app.command("list")
def namespace_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the namespaces, strongest first.

    Example: cdp identity namespace list
    """
    client = _client(ctx)
    reply = client.identity.ListNamespaces(pb.ListNamespacesRequest(), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "namespaces",
        ["name", "type", "unique", "priority", "standard", "description"],
        [(n.name, _type_label(n.type), n.unique, n.priority, n.standard, n.description) for n in reply.namespaces],
    )


def graph(
    ctx: typer.Context,
    identity: Annotated[str, typer.Argument(metavar="NS:VALUE", help="An identity, e.g. email:ann@example.com.")],
    as_json: JsonFlag = False,
) -> None:
    """The graph an identity belongs to: identities, links, first/last seen, sources, guardrail decisions.

    Example: cdp identity graph email:ada@example.com
    """
    client = _client(ctx)
    reply = client.identity.GetGraph(
        pb.GetGraphRequest(identity=inputs.parse_identity(identity)), timeout=client.timeout
    )
    if as_json:
        render.print_message(reply)
        return
    render.out.print(f"profile {reply.profile_id} — primary {reply.primary.namespace}:{reply.primary.value}")
    render.print_table(
        "identities",
        ["identity", "first seen", "last seen", "first source", "last source"],
        [
            (
                f"{n.identity.namespace}:{n.identity.value}",
                n.first_seen.ToJsonString(),
                n.last_seen.ToJsonString(),
                f"{n.dataset}/{n.batch_id}",
                f"{n.last_dataset}/{n.last_batch_id}",
            )
            for n in reply.nodes
        ],
    )
    render.print_table(
        "links",
        ["a", "b", "first seen", "last seen", "source"],
        [
            (
                f"{x.a.namespace}:{x.a.value}",
                f"{x.b.namespace}:{x.b.value}",
                x.first_seen.ToJsonString(),
                x.last_seen.ToJsonString(),
                f"{x.dataset}/{x.batch_id}",
            )
            for x in reply.links
        ],
    )
    if reply.decisions:
        render.print_table(
            "decisions",
            ["rule", "effect", "identity", "reason"],
            [(d.rule, d.effect, f"{d.identity.namespace}:{d.identity.value}", d.reason) for d in reply.decisions],
        )


def unlink(
    ctx: typer.Context,
    identity: Annotated[str, typer.Argument(metavar="NS:VALUE", help="The identity to detach (or one end).")],
    other: Annotated[
        str, typer.Option("--from", metavar="NS:VALUE", help="Remove only the link to this identity.")
    ] = "",
    reason: Annotated[str, typer.Option("--reason", help="Why (kept with the decision).")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Remove an identity from its graph, or one link; the graph splits and stays split.

    Example: cdp identity unlink cookie:shared-tablet --reason 'shared device'
    """
    request = pb.UnlinkRequest(identity=inputs.parse_identity(identity), reason=reason)
    if other:
        request.other.CopyFrom(inputs.parse_identity(other))
    client = _client(ctx)
    reply = client.identity.Unlink(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    if not reply.changed:
        render.success("nothing to unlink (already unlinked); the unlink is remembered")
        return
    render.success(f"{len(reply.decision.removed_links)} links removed ({reply.decision.rule})")
    if reply.HasField("split"):
        render.print_table(
            f"profile {reply.split.profile_id} split",
            ["profile", "identities", "fragments"],
            [(p.profile_id, len(p.identities), len(p.fragment_ids)) for p in reply.split.parts],
        )


def stats(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Counts of identities, links, profiles; dropped identities by namespace and rule; decisions by rule.

    Example: cdp identity stats
    """
    client = _client(ctx)
    reply = client.identity.GetStats(pb.GetStatsRequest(), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "identity graph",
        ["identities", "links", "profiles", "fragments"],
        [(reply.identities, reply.links, reply.profiles, reply.fragments)],
    )
    render.print_table(
        "dropped identities", ["namespace", "rule", "count"], [(d.namespace, d.rule, d.count) for d in reply.dropped]
    )
    render.print_table("decisions", ["rule", "count"], sorted(reply.decisions.items()))


identity_app = group("The identity graph.")
identity_app.add_typer(namespace_app, name="namespace")
identity_app.command("graph")(graph)
identity_app.command("unlink")(unlink)
identity_app.command("stats")(stats)


@identity_app.command("resolve")
def identity_resolve(
    ctx: typer.Context,
    identity: Annotated[str, typer.Argument(metavar="NS:VALUE", help="An identity, e.g. email:ann@example.com.")],
    as_json: JsonFlag = False,
) -> None:
    """The profile id an identity belongs to, and the other identities linked to it.

    Example: cdp identity resolve cookie:ck-1
    """
    request = identity_pb2.ResolveRequest(identity=inputs.parse_identity(identity))
    client = _client(ctx)
    reply = client.identity.Resolve(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        f"profile {reply.profile_id}", ["namespace", "value"], [(i.namespace, i.value) for i in reply.identities]
    )
