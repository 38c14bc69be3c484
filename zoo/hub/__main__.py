"""``python -m zoo.hub``: export a saved zoo model as self-contained remote code, and push a folder to the Hub.

    python -m zoo.hub add-eval MODEL_DIR RESULTS_DIR
    python -m zoo.hub export MODEL_DIR OUT_DIR [--overwrite]
    python -m zoo.hub push DIR --repo-id NAME [--private] [--revision REV] [--dry-run]

Exit codes: 0 done, 2 bad input, 4 push failed (nothing local is changed).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.hub", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_eval = commands.add_parser("add-eval", help="put `python -m eval` results into a model folder's card")
    add_eval.add_argument("model_dir", help="a model folder with a card (README.md)")
    add_eval.add_argument(
        "results_dir", help="the --out folder of `python -m eval` (model_index.yaml inside)"
    )
    export = commands.add_parser("export", help="a folder that loads with trust_remote_code=True without zoo")
    export.add_argument("model_dir", help="a saved zoo model: a run's output_dir or a save_pretrained folder")
    export.add_argument("out_dir")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    push = commands.add_parser("push", help="create the repo and upload the folder (HF_TOKEN, HF_ENDPOINT)")
    push.add_argument("folder")
    push.add_argument("--repo-id", required=True, help="e.g. your-name/zoo-retnet-tiny")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to push to (created if missing); default: main")
    push.add_argument("--commit-message", default=None)
    push.add_argument("--dry-run", action="store_true", help="list what would be uploaded; touch nothing")
    args = parser.parse_args(argv)

    if args.command == "add-eval":
        from zoo.hub.card import add_eval_results

        try:
            card = add_eval_results(args.model_dir, args.results_dir)
        except (FileNotFoundError, ValueError) as err:
            print(f"zoo.hub add-eval: {err}", file=sys.stderr)
            return 2
        print(f"evaluation results added to {card}")
        return 0

    if args.command == "export":
        from zoo.hub.export import ExportError, export

        try:
            out = export(args.model_dir, args.out_dir, overwrite=args.overwrite)
        except (ExportError, OSError) as err:
            print(f"zoo.hub export: {err}", file=sys.stderr)
            return 2
        print(
            f"exported to {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, "
            "trust_remote_code=True)"
        )
        return 0

    from zoo.hub.push import COMMIT_MESSAGE, HubPushError, push_folder

    try:
        result = push_folder(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message or COMMIT_MESSAGE,
            dry_run=args.dry_run,
        )
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    except HubPushError as err:
        print(err, file=sys.stderr)
        return 4
    if args.dry_run:
        print(f"would create {args.repo_id} ({'private' if args.private else 'public'}) and upload:")
        print("\n".join(f"  {path}" for path in result))
    else:
        print(f"pushed {args.folder} to {args.repo_id}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
