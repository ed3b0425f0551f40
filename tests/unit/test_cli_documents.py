"""YAML definitions (`cdp apply`, examples/): every key checked against the service's message
before anything is sent, with the nearest valid key or value suggested; short enum spellings;
fields only the service sets refused; the shipped examples are valid and equal to what the
protobuf JSON form gives."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import json_format

from cdp.activation.v1 import activation_pb2 as act
from cdp.ingest.v1 import ingest_pb2 as ing
from cdp_cli.documents import APPLY_ORDER, KINDS, DocumentError, load, load_all

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path: Path, text: str, name: str = "defs.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_examples_are_valid_and_cover_every_step_of_the_demo() -> None:
    documents = load_all([EXAMPLES])
    kinds = [d.kind.name for d in documents]
    assert kinds == sorted(kinds, key=APPLY_ORDER.index)
    names = {(d.kind.name, d.name) for d in documents}
    assert {("schema", "crm_person"), ("dataset", "web"), ("segment", "gold_members")} <= names
    assert {("destination", "crm_file_drop"), ("activation", "gold_members")} <= names


def test_a_short_lower_case_enum_is_the_full_value(tmp_path: Path) -> None:
    [doc] = load(
        write(
            tmp_path,
            "kind: schema\nname: s\nschema_class: profile\n"
            "fields:\n  - {name: id, type: string, identity_namespace: crm_id}\n"
            "  - {name: tags, type: array, items: string}\n",
        )
    )
    expected = json_format.ParseDict(
        {
            "name": "s",
            "schema_class": "SCHEMA_CLASS_PROFILE",
            "fields": [
                {"name": "id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id"},
                {"name": "tags", "type": "FIELD_TYPE_ARRAY", "items": "FIELD_TYPE_STRING"},
            ],
        },
        ing.Schema(),
    )
    assert doc.message == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "kind: schema\nname: s\nfields:\n  - {name: a, type: string}\n  - {name: b, identity_namspace: x}\n",
            "fields[1]: unknown key 'identity_namspace'; did you mean 'identity_namespace'?",
        ),
        ("kind: dataset\nname: d\nschema: s\n", "unknown key 'schema'; did you mean 'schema_name'?"),
        ("kind: segmnet\nname: x\n", "unknown kind 'segmnet'; did you mean 'segment'?"),
        ("kind: schema\nname: s\nschema_class: profil\n", "'profil' is not a SchemaClass; did you mean 'profile'?"),
        ("kind: destination\nid: d1\nname: d\n", "id: set by the service"),
        (
            "kind: schema\nname: s\nfields: [{name: a, type: FIELD_TYPE_STRNG}]\n",
            "fields[0].type: 'FIELD_TYPE_STRNG' is not a FieldType; did you mean 'string'?",
        ),
        ("kind: schema\nname: s\nfields: {name: a}\n", "fields: expected a list"),
        ("kind: segment\nname: [1, 2]\n", "(segment)"),
        ("name: s\n", "a document is a mapping with a 'kind'"),
        ("kind: [schema]\nname: s\n", "unknown kind ['schema']"),
    ],
)
def test_a_mistake_is_refused_with_where_and_the_nearest_valid_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DocumentError) as refused:
        load(write(tmp_path, text))
    assert message in refused.value.message
    assert "defs.yaml" in refused.value.message


def test_the_document_is_named_in_a_file_of_several(tmp_path: Path) -> None:
    path = write(tmp_path, "kind: segment\nname: a\nquery: x\n---\nkind: segment\nname: b\nquerry: y\n")
    with pytest.raises(DocumentError, match=r"defs.yaml document 2 \(segment\): unknown key 'querry'; did you mean"):
        load(path)


def test_a_destination_config_is_free_form_and_camel_case_keys_are_accepted(tmp_path: Path) -> None:
    [doc] = load(
        write(
            tmp_path,
            "kind: destination\nname: hook\nconnector: webhook\nmarketingAction: data_sharing\n"
            "config: {base_url: 'http://127.0.0.1:9/x', any_key: [1, {a: b}]}\n",
        )
    )
    assert isinstance(doc.message, act.Destination)
    assert doc.message.marketing_action == "data_sharing"
    assert json_format.MessageToDict(doc.message.config)["any_key"] == [1, {"a": "b"}]


def test_every_kind_maps_to_a_method_of_its_service() -> None:
    from cdp.activation.v1 import activation_pb2_grpc
    from cdp.identity.v1 import identity_pb2_grpc
    from cdp.ingest.v1 import ingest_pb2_grpc
    from cdp.segmentation.v1 import segmentation_pb2_grpc

    servicers = {
        "ingest": ingest_pb2_grpc.IngestServiceServicer,
        "identity": identity_pb2_grpc.IdentityServiceServicer,
        "segmentation": segmentation_pb2_grpc.SegmentationServiceServicer,
        "activation": activation_pb2_grpc.ActivationServiceServicer,
    }
    for kind in KINDS.values():
        assert hasattr(servicers[kind.service], kind.method), kind
        kind.request(kind.message())  # the request builder takes the document's message


def test_the_merge_policy_writes_its_own_kind_as_policy(tmp_path: Path) -> None:
    from cdp.segmentation.v1 import segmentation_pb2 as seg

    [doc] = load(write(tmp_path, "kind: merge_policy\npolicy: dataset_precedence\ndatasets: [crm, loyalty]\n"))
    assert doc.message == seg.MergePolicy(kind=seg.MERGE_POLICY_KIND_DATASET_PRECEDENCE, datasets=["crm", "loyalty"])
    with pytest.raises(DocumentError, match="'dataset_precedense' is not a MergePolicyKind; did you mean"):
        load(write(tmp_path, "kind: merge_policy\npolicy: dataset_precedense\n", "typo.yaml"))
