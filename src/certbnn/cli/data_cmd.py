"""``certbnn data``: list, check and download data sets."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from certbnn import data
from certbnn.data import npz
from certbnn.data.download import download_dataset, file_digest
from certbnn.errors import DataError

DATA_DIR_HELP = (
    "directory holding the data set, either a data root with mnist/, fashion-mnist/, "
    "cifar10/ (or <name>-<variant>/) folders, or the data set's own folder; when "
    f"given, nothing else is searched (default: ${data.ENV_VAR}, then the user cache, "
    "then /usr/share/datasets)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="list, check and download data sets",
        description="List, check and download the data sets certbnn can train on.",
    )
    commands = parser.add_subparsers(title="data commands", metavar="ACTION", required=True)

    p = commands.add_parser(
        "list",
        help="known data sets and where each was found",
        description="Show every known data set and the folder it was found in, then the npz "
        "data sets found as NAME/data.npz under the data roots.",
    )
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run_list)

    p = commands.add_parser(
        "check",
        help="load and verify a data set",
        description="Load every split of a data set, verify formats, counts and label range, "
        "and print counts per split and class and the pixel range. Exits non-zero "
        "on any problem.",
    )
    p.add_argument(
        "name",
        help=f"data set name ({', '.join(data.known_datasets())}, or a folder NAME/data.npz "
        "under a data root) or PATH.npz",
    )
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run_check)

    p = commands.add_parser(
        "download",
        help="download a data set's canonical files (checksummed, resumable)",
        description="Fetch the canonical archives over HTTP(S), verify their md5/sha256, and "
        "store them atomically; an interrupted download resumes where it stopped.",
    )
    p.add_argument("name", help=f"data set name ({', '.join(data.known_datasets())})")
    p.add_argument(
        "--data-dir",
        help="data root to download into (default: the first "
        f"${data.ENV_VAR} entry if set, else the user cache {data.cache_root()})",
    )
    p.add_argument("--mirror", metavar="URL", help="base URL to fetch the files from instead of the canonical mirrors")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per network read (default 60)")
    p.add_argument("--retries", type=int, default=3, help="retries per file (default 3)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=run_download)


def run_list(args: argparse.Namespace) -> int:
    rows = []
    for name in data.known_datasets():
        spec = data.get_spec(name)
        if spec.source is not None:  # npz data sets: listed fresh from the roots below
            continue
        found = data.find_dataset(spec, args.data_dir)
        rows.append(
            {
                "name": name,
                "description": spec.description,
                "found": found is not None,
                "path": str(found.path) if found else None,
                "origin": found.origin if found else None,
            }
        )
    for name, path, origin in npz.discover(args.data_dir):
        if name not in {r["name"] for r in rows}:
            rows.append({"name": name, "description": "npz folder", "found": True, "path": str(path), "origin": origin})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        where = f"{r['path']}  ({r['origin']})" if r["found"] else "not found"
        print(f"{r['name']:<{width}}  {where}")
    roots = ", ".join(f"{r.path} ({r.origin})" for r in data.search_roots(args.data_dir))
    print(f"\nsearched: {roots}")
    return 0


def check_dataset(name: str, data_dir: str | None = None) -> dict[str, Any]:
    """Load every split of ``name`` and return a report; ``report["problems"]`` lists
    what does not match the spec (empty when all is well). Format errors raise DataError."""
    spec = data.registered_spec(name)
    if spec is None or spec.source is not None:  # an npz data set: read and checked afresh
        spec = npz.resolve(name, data_dir)
        if spec is None:  # not (or no longer) found: an unknown name
            data.unregister(name)
            spec = data.get_spec(name, data_dir)
    folder = data.locate(spec, data_dir)
    report: dict[str, Any] = {
        "name": name,
        "path": str(spec.source or folder),
        "splits": {},
        "files": {},
        "problems": [],
    }
    if spec.sha256:
        report["sha256"] = spec.sha256
    for split, expected in spec.splits.items():
        start = time.perf_counter()
        ds = data.load(name, split, data_dir if spec.source else folder)
        images = ds.images
        report["splits"][split] = {
            "count": len(ds),
            "expected": expected,
            "image_shape": list(ds.image_shape),
            "num_classes": ds.num_classes,
            "class_counts": ds.class_counts(),
            "pixel_min": int(images.min()) if images.dtype == np.uint8 else float(images.min()),
            "pixel_max": int(images.max()) if images.dtype == np.uint8 else float(images.max()),
            "load_seconds": round(time.perf_counter() - start, 3),
        }
        if expected is not None and len(ds) != expected:
            report["problems"].append(f"{split}: {len(ds)} examples, expected {expected}")
        empty = [c for c, n in enumerate(ds.class_counts()) if n == 0]
        if empty:
            report["problems"].append(f"{split}: no examples of class(es) {empty}")
    for resource in spec.resources:
        path = Path(folder) / resource.filename
        if path.exists() and resource.md5:
            report["files"][resource.filename] = {"canonical_md5": file_digest(path, "md5") == resource.md5}
    report["ok"] = not report["problems"]
    return report


def run_check(args: argparse.Namespace) -> int:
    report = check_dataset(args.name, args.data_dir)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['name']}: {report['path']}")
        for split, info in report["splits"].items():
            shape = "x".join(map(str, info["image_shape"]))
            print(
                f"  {split:<5} {info['count']:>6} images {shape}, pixels "
                f"{info['pixel_min']:g}..{info['pixel_max']:g}, per class {info['class_counts']}"
            )
        for filename, info in report["files"].items():
            status = (
                "canonical" if info["canonical_md5"] else "differs from the canonical md5 (re-encoded or lossy copy?)"
            )
            print(f"  {filename}: {status}")
        if report.get("sha256"):
            print(f"  sha256 {report['sha256']}")
        print("  OK" if report["ok"] else "  FAILED")
    if not report["ok"]:
        raise DataError(f"{args.name}: " + "; ".join(report["problems"]))
    return 0


def run_download(args: argparse.Namespace) -> int:
    spec = data.get_spec(args.name)
    if args.data_dir:
        root = Path(args.data_dir)
    else:
        roots = [r.path for r in data.search_roots() if r.origin == data.ENV_VAR]
        root = roots[0] if roots else data.cache_root()
    folder = download_dataset(
        spec, root, mirror=args.mirror, progress=not args.no_progress, timeout=args.timeout, retries=args.retries
    )
    print(f"{args.name}: downloaded and verified in {folder}")
    return 0
