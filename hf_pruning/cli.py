"""``hf-prune``: the command line. Parsing only; every action calls the public API.

    hf-prune apply MODEL PLAN.json OUT      apply a hand-written plan, save atomically
    hf-prune show MODEL                     print the plan and per-layer structure a model carries
    hf-prune verify MODEL                   reload MODEL in a fresh process without hf_pruning
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger("hf_pruning.cli")


def _load(path: str):
    import hf_pruning

    return hf_pruning.from_pretrained(path)


def cmd_apply(args) -> int:
    import hf_pruning

    model = _load(args.model)
    plan = hf_pruning.api._as_plan(args.plan)
    hf_pruning.prune_(model, hf_pruning.PlanConfig(plan=plan.to_dict()))
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        logger.warning("no tokenizer found next to %s; saving the model only", args.model)
    hf_pruning.save_pretrained(model, args.out, tokenizer=tokenizer)
    sys.stdout.write(f"saved {type(model).__name__} with {len(hf_pruning.get_plan(model))} op(s) to {args.out}\n")
    return 0


def cmd_show(args) -> int:
    import hf_pruning
    from hf_pruning.adapters import inspect_model

    model = _load(args.model)
    out = {
        "class": type(model).__name__,
        "parameters": hf_pruning.parameter_count(model),
        "pruning_plan": hf_pruning.get_plan(model).to_dict(),
        "pruning_config": getattr(model.config, "pruning_config", None),
        "layers": [
            {"attention": s.attention, "q_heads": s.q_heads, "kv_heads": s.kv_heads, "mlp": s.mlp,
             "mlp_width": s.mlp_width}
            for s in inspect_model(model)
        ],
    }
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


def cmd_verify(args) -> int:
    import torch

    from hf_pruning.verify import reload_in_fresh_process

    model = _load(args.model)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    out = reload_in_fresh_process(args.model, ids, max_new_tokens=8)
    same = torch.equal(out["logits"], expected)
    same_gen = torch.equal(out["generated"], out["generated_no_cache"])
    sys.stdout.write(f"reloaded as {out['class']} without hf_pruning: identical logits={same}, "
                     f"generate with/without cache agree={same_gen}\n")
    return 0 if same and same_gen else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-prune", description="Prune Hugging Face causal LMs in place.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("apply", help="apply a pruning plan (JSON file) and save the result")
    p.add_argument("model", help="model folder or Hub name")
    p.add_argument("plan", help="pruning plan JSON file")
    p.add_argument("out", help="output folder (written atomically)")
    p.set_defaults(func=cmd_apply)
    p = sub.add_parser("show", help="print the plan and per-layer structure of a model")
    p.add_argument("model")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("verify", help="reload a saved model in a fresh process without hf_pruning")
    p.add_argument("model")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from hf_pruning.plan import PlanError

    try:
        return args.func(args)
    except (PlanError, ValueError, FileNotFoundError, OSError) as err:
        sys.stderr.write(f"hf-prune: error: {err}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
