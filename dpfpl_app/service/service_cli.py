"""``dpfpl predict`` and ``dpfpl inspect``: the prompt-as-a-service subcommands.

Kept apart from ``cli.py`` (which only hooks them in) so the service's user interface
lives next to nothing else. Results go to stdout (text or ``--json``); progress and
per-file errors go to the log (stderr), so ``--json`` output stays parseable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpfpl_app.service.predict import Failure, Prediction

EXIT_SOME_FAILED = 1


def _predict(args: argparse.Namespace) -> int:
    # imported here: torch and transformers cost seconds, and `dpfpl --help` needs neither
    from dpfpl_app.service.predict import Failure, PromptClassifier, classify

    classifier = PromptClassifier.from_file(args.prompt, model=args.model, device=args.device)
    results = list(classify(classifier, args.images, top_k=args.top_k, batch_size=args.batch_size))
    if args.json:
        print(json.dumps([_as_json(r) for r in results], indent=2))
    else:
        for result in results:
            print(_as_text(result))
    failed = [r for r in results if isinstance(r, Failure)]
    for failure in failed:
        print(f"dpfpl predict: {failure.path}: {failure.error}", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else 0


def _as_json(result: Prediction | Failure) -> dict:
    from dpfpl_app.service.predict import Failure

    if isinstance(result, Failure):
        return {"path": result.path, "error": result.error}
    top = [{"class": name, "probability": prob} for name, prob in result.top]
    return {"path": result.path, "top": top}


def _as_text(result: Prediction | Failure) -> str:
    from dpfpl_app.service.predict import Failure

    if isinstance(result, Failure):
        return f"{result.path}\tERROR {result.error}"
    return result.path + "\t" + "  ".join(f"{name} {prob:.3f}" for name, prob in result.top)


def _inspect(args: argparse.Namespace) -> int:
    from dpfpl_app.method.prompt_file import load_prompt_file

    prompt_file = load_prompt_file(args.prompt)
    print(prompt_file.metadata.model_dump_json(indent=2))
    return 0


def add_service_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``predict`` and ``inspect`` on the ``dpfpl`` command's subparsers."""
    p = sub.add_parser("predict", help="classify images with an exported prompt file")
    p.add_argument("images", nargs="+", type=Path, help="image files and/or folders of images")
    p.add_argument("--prompt", type=Path, required=True, help="a prompt .safetensors file")
    p.add_argument(
        "--model", default=None, help="backbone directory to use instead of the one named"
    )
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    p.add_argument(
        "--batch-size", type=int, default=64, help="images encoded together (default 64)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(func=_predict)

    p = sub.add_parser("inspect", help="verify a prompt file and print its metadata")
    p.add_argument("prompt", type=Path, help="a prompt .safetensors file")
    p.set_defaults(func=_inspect)
