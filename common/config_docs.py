"""Write docs/configuration.md from the configuration schema.

    python -m common.config_docs            # the page on stdout
    python -m common.config_docs --write    # rewrite docs/configuration.md in place

The page is made only from ``common.config.describe_options()`` (every option's
dotted key, default and one-line description), the docstrings of the
schema's section classes and the file schemas (which file sets each section),
so an option added to the schema appears here after one command.
tests/test_docs.py fails while the committed page is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import config

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
"""The generated page, relative to the repository root: docs/configuration.md."""

COMMAND = ".venv/bin/python -m common.config_docs --write"
"""The one command that regenerates the page, quoted in its header."""

HEADER = f"""\
# Configuration reference

<!-- Generated from common/config/ by `{COMMAND}`. Do not edit by hand. -->

This page is generated from the schema in `common/config/schema.py`: every option,
its default and its description. After changing an option there, regenerate
it with

```bash
{COMMAND}
```

(`tests/test_docs.py` fails while this page is stale.)

## Setting options

Options are set in YAML files, each with its own schema
(`common/config/files.py`): the centre's `federation.yaml` (and a
simulation's YAML) holds every section but `site`; a hospital's `site.yaml`
holds its `site` section and only `train.device` and `train.precision` of
the training settings (its hardware); a key a file may not hold is refused
with where it belongs. An option left out keeps its default and counts as
unset: a `site.yaml` that writes `train.device: auto` sets it, and it wins
over the centre's `cuda`. Sites receive only the centre's `model`, `data` and
`train` sections and the run's `federation.rounds`, `run_name`, `run_id` and
`wire_dtype`. Commented examples: `deploy/federation.yaml`,
`deploy/site.yaml`, `simulations/demo.yaml`.

Every command takes `--config FILE.yaml` and `--set section.key=value`
(repeatable, beats the file), for example

```bash
.venv/bin/fedseg-sim --rounds 5 --set train.local_steps=20 --set train.norm_mode=shared
```

A misspelt key fails with the file, the key and the closest valid key:

```
fedseg-sim run: error: sim.yaml: unknown key 'train.lcoal_steps'. Did you mean 'local_steps'?
```
"""


def section_docs() -> dict[str, str]:
    """Each section's own docstring and the files that set it, by section name."""
    docs = {}
    for name, field in config.FedsegConfig.model_fields.items():
        files = [
            f"`{config.FILE_NAMES[schema].split()[-1]}`"
            for schema in (config.CentreFile, config.SiteFile)
            if name in schema.model_fields
        ]
        if name == "train":
            files[-1] += f" (only {', '.join(f'`train.{k}`' for k in config.SITE_TRAIN_KEYS)})"
        doc = " ".join((field.annotation.__doc__ or "").split())
        docs[name] = f"{doc} Set in {' and '.join(files)}." if files else doc
    return docs


def removed_options() -> list[str]:
    """One line per removed option or value, with the measurement behind its removal."""
    lines = [f"- `{key}`: {why}." for key, (_, why) in config.REMOVED_OPTIONS.items()]
    lines += [
        f"- `{key}: {value}`: {why}." for key, values in config.REMOVED_VALUES.items() for value, why in values.items()
    ]
    return lines


def format_default(value: Any) -> str:
    """A default as it would be written in YAML, inside a code span."""
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" else f"`{value}`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    try:
        text = json.dumps(value)
    except TypeError:
        text = str(value)
    return f"`{text}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render() -> str:
    """The whole page, as docs/configuration.md holds it."""
    sections: dict[str, list[tuple[str, Any, str]]] = {}
    for row in config.describe_options():
        key, default, doc = row[0], row[1], row[2]
        sections.setdefault(key.split(".", 1)[0], []).append((key, default, doc))
    docs = section_docs()
    lines = [HEADER.rstrip("\n"), "", "Sections: " + ", ".join(f"[`{s}`](#{s})" for s in sections) + "."]
    for section, rows in sections.items():
        lines += ["", f"## {section}", ""]
        if docs.get(section):
            lines += [docs[section], ""]
        lines += ["| option | default | description |", "|---|---|---|"]
        lines += [f"| `{key}` | {_cell(format_default(default))} | {_cell(doc)} |" for key, default, doc in rows]
    lines += [
        "",
        "## Removed options",
        "",
        "Measurements showed these do not help; a config that names one is "
        "refused with this reason (one written before, at the value that behaves as fedseg now does, loads).",
        "",
        *removed_options(),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.config_docs", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {PAGE.parent.name}/{PAGE.name} in place")
    args = parser.parse_args(argv)
    page = render()
    if args.write:
        PAGE.write_text(page)
        print(f"wrote {PAGE}", file=sys.stderr)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
