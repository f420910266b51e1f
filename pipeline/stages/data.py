"""``data`` stage: local files / saved HF datasets -> megatron indexed datasets, a blend manifest and the
importance stage's calibration subset (library: data_prep.build; docs/data.md)."""

from data_prep.build import plan, prepare
from data_prep.layout import data_dir


def add_arguments(parser) -> None:
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first bad record (file:line) instead of counting and skipping it")
    parser.add_argument("--force", action="store_true", help="re-tokenize sources even when up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def dry_run(recipe, args) -> None:
    print(plan(recipe))


def main(recipe, args) -> None:
    report = prepare(recipe, strict=args.strict, force=args.force, progress=not args.no_progress)
    print(report.format())
    print(f"data ready in {data_dir(recipe)} (blend.json, report.json, <source>.dropped.tsv)")
