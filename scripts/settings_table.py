"""Print the README's configuration table from the settings classes (``make settings-table``)."""

from __future__ import annotations

from pydantic.fields import FieldInfo

from cdp_activation.settings import ActivationSettings
from cdp_identity.settings import IdentitySettings
from cdp_ingest.settings import IngestSettings
from cdp_kit.settings import ServiceSettings
from cdp_segmentation.settings import SegmentationSettings


def default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value in (None, "", [], ()):
        return "(unset)"
    if isinstance(value, list | tuple) and len(str(value)) > 40:
        return f"{len(value)} values (see the service guide)"
    return f"`{value}`"


def rows() -> list[str]:
    out = ["| variable | service | default | meaning |", "|---|---|---|---|"]
    base = ServiceSettings.model_fields
    out += [f"| `CDP_{n.upper()}` | all | {default(f)} | {f.description or ''} |" for n, f in base.items()]
    for cls in (IngestSettings, IdentitySettings, SegmentationSettings, ActivationSettings):
        out += [
            f"| `CDP_{n.upper()}` | {cls.service} | {default(f)} | {f.description or ''} |"
            for n, f in cls.model_fields.items()
            if n not in base
        ]
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
