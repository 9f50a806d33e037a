"""What the encoder registry offers, formatted for people: `wsi-pipeline encoders [NAME]`, the README's
encoder table and the `configs/encoders/NAME.yaml` presets all come from here, so they cannot drift
from the registry (tests/encoders/test_catalog.py checks README.md and configs/encoders/).

    python -m wsi_pipeline.encoders.catalog --write      # regenerate README block + presets
    python -m wsi_pipeline.encoders.catalog --check      # exit 1 when either is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from . import get_spec, list_encoders
from .registry import EncoderSpec

README_START = "<!-- encoders:start -->"
README_END = "<!-- encoders:end -->"
PRESETS_DIR = Path("configs") / "encoders"
REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_PLACEHOLDER_DIR = "/path/to"


def primary_names() -> list[str]:
    """Registered entries without their aliases (an alias is listed with its entry)."""
    names = list_encoders()
    aliases = {a for n in names for a in get_spec(n).aliases}
    return [n for n in names if n not in aliases]


def has_preset(spec: EncoderSpec) -> bool:
    """A preset needs the authors' tiling: their µm/px and patch side."""
    return spec.native_mpp is not None and spec.recommended_patch_px is not None


def checkpoint_line(spec: EncoderSpec) -> str:
    if spec.parameter_free:
        return "none"
    # The first file a user downloads is the weights file (a hub snapshot folder works too).
    weights = spec.files[0] if spec.files else "weights.safetensors"
    return f"{CHECKPOINT_PLACEHOLDER_DIR}/{weights}"


def config_dict(spec: EncoderSpec) -> dict:
    """The config sections to use this entry as its authors did (tiling only where they say)."""
    out: dict = {}
    if has_preset(spec):
        out["tiling"] = {"target_mpp": float(spec.native_mpp), "patch_size_px": int(spec.recommended_patch_px)}
    out["extract"] = {"encoder": spec.name, "checkpoint": checkpoint_line(spec)}
    return out


def config_snippet(spec: EncoderSpec) -> str:
    return yaml.safe_dump(config_dict(spec), sort_keys=False).rstrip("\n")


def input_summary(spec: EncoderSpec) -> str:
    """How a patch becomes the encoder's input, e.g. "resize 224 bicubic+aa" or "as tiled"."""
    if spec.resize_px is None and spec.crop_px is None:
        return "as tiled"
    parts = []
    if spec.resize_px is not None:
        parts.append(f"resize {spec.resize_px} {spec.interpolation}{'+aa' if spec.antialias else ''}")
    if spec.crop_px is not None:
        parts.append(f"crop {spec.crop_px}")
    return ", ".join(parts)


def licence_summary(spec: EncoderSpec) -> str:
    return spec.weights_license + (" (gated)" if spec.gated else "")


def _mpp(spec: EncoderSpec) -> str:
    return str(float(spec.native_mpp)) if spec.native_mpp is not None else "-"


def table_rows() -> list[dict[str, str]]:
    rows = []
    for name in primary_names():
        spec = get_spec(name)
        rows.append({
            "encoder": name + (f" ({', '.join(spec.aliases)})" if spec.aliases else ""),
            "dim": str(spec.out_dim),
            "µm/px": _mpp(spec),
            "tile px": str(spec.recommended_patch_px) if spec.recommended_patch_px else "-",
            "input": input_summary(spec),
            "output": spec.output or "-",
            "GPU precision": spec.precision,
            "weights licence": licence_summary(spec) or "-",
            "files": ", ".join(spec.files) or "-",
            "config": (f"configs/encoders/{name}.yaml" if has_preset(spec) else f"extract.encoder: {name}"),
        })
    return rows


def markdown_table() -> str:
    rows = table_rows()
    header = list(rows[0])
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines)


def readme_block() -> str:
    """The README text between the markers (markers excluded)."""
    return ("\n_Generated from the registry by `python -m wsi_pipeline.encoders.catalog --write`; "
            "`wsi-pipeline encoders NAME` prints one entry in full._\n\n" + markdown_table() + "\n")


def text_table(width: int = 34) -> str:
    """`wsi-pipeline encoders`: one line per entry, long cells (not the config) cut at `width` characters."""
    rows = table_rows()
    columns = ["encoder", "dim", "µm/px", "tile px", "input", "GPU precision", "weights licence", "files", "config"]
    cut = lambda text: text if len(text) <= width else text[:width - 1] + "…"  # noqa: E731
    cells = [[r[c] if c == "config" else cut(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    fmt = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(columns), *(fmt(row) for row in cells)])


def describe(name: str) -> str:
    """`wsi-pipeline encoders NAME`: every metadata field, then the config lines to use."""
    spec = get_spec(name)
    meta = spec.metadata()
    lines = [f"{name}"]
    for key, value in meta.items():
        if isinstance(value, tuple):
            value = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "-"
        lines.append(f"  {key:22s} {value if value not in (None, '') else '-'}")
    lines.append(f"  {'input':22s} {input_summary(spec)}")
    lines.append("")
    lines.append("config (tiling: the authors'; checkpoint: the file you downloaded):" if has_preset(spec)
                 else "config:")
    lines += ["  " + line for line in config_snippet(spec).splitlines()]
    if has_preset(spec):
        lines.append(f"preset: configs/encoders/{name}.yaml")
    return "\n".join(lines)


def preset_text(name: str) -> str:
    """configs/encoders/NAME.yaml: the authors' tiling and the extract lines."""
    spec = get_spec(name)
    header = [f"# {name}: {spec.reference or spec.notes}".rstrip(),
              f"# Generated by `python -m wsi_pipeline.encoders.catalog --write` from the registry; do not edit.",
              f"# Tiling at the authors' {_mpp(spec)} µm/px and {spec.recommended_patch_px} px; the encoder's "
              f"input: {input_summary(spec)}.",
              "# Set extract.checkpoint to the weights file you downloaded; add the other sections you need",
              "# (configs/default.yaml documents every key)."]
    return "\n".join(header) + "\n" + config_snippet(spec) + "\n"


def expected_presets() -> dict[str, str]:
    return {f"{n}.yaml": preset_text(n) for n in primary_names() if has_preset(get_spec(n))}


def replace_readme_block(text: str, block: str) -> str:
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {README_START} ... {README_END} block")
    return text[:start + len(README_START)] + block + text[end:]


def readme_block_of(text: str) -> str:
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {README_START} ... {README_END} block")
    return text[start + len(README_START):end]


def stale_files(root: Path = REPO_ROOT) -> list[str]:
    """Files that differ from what the registry generates (README block, presets, extra presets)."""
    stale = []
    readme = root / "README.md"
    if readme_block_of(readme.read_text(encoding="utf-8")) != readme_block():
        stale.append(str(readme))
    presets = root / PRESETS_DIR
    want = expected_presets()
    for file, text in want.items():
        path = presets / file
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(str(path))
    if presets.is_dir():
        stale += [str(p) for p in sorted(presets.glob("*.yaml")) if p.name not in want]
    return stale


def write_all(root: Path = REPO_ROOT) -> list[str]:
    from ..io import write_text_atomic

    readme = root / "README.md"
    write_text_atomic(readme, replace_readme_block(readme.read_text(encoding="utf-8"), readme_block()))
    presets = root / PRESETS_DIR
    presets.mkdir(parents=True, exist_ok=True)
    want = expected_presets()
    for file, text in want.items():
        write_text_atomic(presets / file, text)
    for old in presets.glob("*.yaml"):
        if old.name not in want:   # an entry that lost its tiling or was removed
            old.unlink()
    return [str(readme), *(str(presets / f) for f in want)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsi_pipeline.encoders.catalog", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="regenerate README.md's encoder block and configs/encoders/")
    group.add_argument("--check", action="store_true", help="exit 1 when they differ from the registry")
    group.add_argument("--readme", action="store_true", help="print the README block")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    if args.readme:
        print(readme_block())
        return 0
    if args.write:
        for path in write_all(args.root):
            print(f"wrote {path}")
        return 0
    stale = stale_files(args.root)
    for path in stale:
        print(f"out of date: {path}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
