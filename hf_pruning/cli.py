"""``hf-prune``: the command line. Parsing only; every action calls the public API.

    hf-prune prune MODEL OUT --method NAME [method flags] [--calib SOURCE ...]   prune, save atomically
    hf-prune eval MODEL [--ppl SOURCE] [--tasks ...] [--speed]                  evaluate, print JSON
    hf-prune bench [--quick]                                                    the benchmark grid
    hf-prune apply MODEL PLAN.json OUT      apply a hand-written plan, save atomically
    hf-prune show MODEL                     print the plan and per-layer structure a model carries
    hf-prune verify MODEL                   reload MODEL in a fresh process without hf_pruning

Method flags come from the method's config dataclass (``hf-prune prune --method NAME --help`` lists them).
Exit codes: 0 success, 1 a check failed, 2 bad input (the message says what and how to fix it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing

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
        "sparsity": hf_pruning.sparsity_report(model),
        "layers": [
            {"attention": s.attention, "q_heads": s.q_heads, "kv_heads": s.kv_heads, "mlp": s.mlp,
             "mlp_width": s.mlp_width}
            for s in inspect_model(model)
        ],
    }
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    if args.removal_map:
        from hf_pruning.plots import removal_map

        removal_map(model, args.removal_map, title=f"{args.model}")
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


def _field_type(hint):
    """argparse type for a config field annotation (JSON for dicts and lists)."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        hint, origin = args[0], typing.get_origin(args[0])
    if hint in (dict, list) or origin in (dict, list, tuple):
        return json.loads
    return hint if hint in (int, float, str) else str


def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per dataclass field of ``config_cls`` (help from ``field(metadata={"help": ...})``)."""
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group(f"{config_cls.method} options ({config_cls.__name__})")
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if hints[f.name] is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=_field_type(hints[f.name]), default=None, help=help_text)


def config_from_args(config_cls, args):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if getattr(args, f.name, None) is not None}
    return config_cls(**values)


def cmd_prune(args) -> int:
    import hf_pruning
    from hf_pruning.calibration import build_calibration

    spec = hf_pruning.get_method(args.method)
    config = config_from_args(spec.config_class, args)
    model = _load(args.model)
    tokenizer = _tokenizer(args.model)
    calibration = None
    if spec.needs_calibration and config.uses_calibration():  # e.g. HARP with given alphas needs none
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer; calibration text cannot be tokenized")
        calibration = build_calibration(tokenizer, source=args.calib, n_samples=args.n_samples, seq_len=args.seq_len,
                                        seed=args.seed, max_length=getattr(model.config, "max_position_embeddings", None))
    hf_pruning.prune_(model, config, calibration=calibration)
    hf_pruning.save_pretrained(model, args.out, tokenizer=tokenizer)
    sys.stdout.write(f"saved {type(model).__name__} pruned with {args.method} to {args.out}\n")
    return 0


def cmd_eval(args) -> int:
    import hf_pruning
    from hf_pruning.calibration import evaluation_windows, load_text
    from hf_pruning.evaluation import measure_speed, perplexity, zero_shot

    model = _load(args.model)
    tokenizer = _tokenizer(args.model)
    out = {"model": args.model, "parameters": hf_pruning.parameter_count(model)}
    if args.ppl:
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer; perplexity needs one")
        windows = evaluation_windows(tokenizer, load_text(args.ppl), args.seq_len, args.windows,
                                     max_length=getattr(model.config, "max_position_embeddings", None))
        out["ppl"] = perplexity(model, windows, progress=not args.quiet)
        out["ppl_tokens"] = windows.numel()
    if args.tasks:
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer; zero-shot evaluation needs one")
        out["acc"] = zero_shot(model, tokenizer, [t for t in args.tasks.split(",") if t], limit=args.limit)
    if args.speed:
        out["speed"] = measure_speed(model)
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


def cmd_bench(args) -> int:
    from hf_pruning.benchmark import run_benchmarks

    results = run_benchmarks(args.out, quick=args.quick, data_dir=args.data_dir)
    failed = [r["key"] for r in results["rows"] if r.get("error")]
    sys.stdout.write(f"{len(results['rows'])} row(s) in {args.out}; failed: {failed or 'none'}\n")
    return 1 if failed else 0


def _tokenizer(path: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        logger.warning("no tokenizer found next to %s", path)
        return None


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-prune", description="Prune Hugging Face causal LMs in place.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="prune a model with a registered method and save the result")
    p.add_argument("model", help="model folder or Hub name")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--method", required=True, help="registered method (see --list-methods)")
    p.add_argument("--calib", default="default:calibration",
                   help="calibration text: file, folder, 'default[:calibration]', 'wikitext2', 'c4' or 'hf:<dataset>'")
    p.add_argument("--n-samples", type=int, default=16, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0)
    if method is not None:
        import hf_pruning

        add_config_arguments(p, hf_pruning.get_method(method).config_class)
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("eval", help="perplexity, zero-shot accuracy and speed of a model (JSON on stdout)")
    p.add_argument("model")
    p.add_argument("--ppl", help="evaluation text (same sources as --calib); omit to skip perplexity")
    p.add_argument("--windows", type=int, default=32, help="windows of --seq-len tokens (32 x 512 = 16k tokens)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tasks", default="", help="comma-separated lm-eval tasks (local: social_iqa,wikihow_goal_inference)")
    p.add_argument("--limit", type=int, default=300, help="items per task (the first N)")
    p.add_argument("--speed", action="store_true", help="prefill/decode tokens per second and KV bytes per token")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("bench", help="run the benchmark grid on SmolLM2-135M (resumable)")
    p.add_argument("--quick", action="store_true", help="a small subset on fewer tokens (under 15 minutes)")
    p.add_argument("--out", default="benchmarks/results", help="results folder")
    p.add_argument("--data-dir", default=None, help="folder of the Austen novels (default: ../shared/data/austen)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("apply", help="apply a pruning plan (JSON file) and save the result")
    p.add_argument("model", help="model folder or Hub name")
    p.add_argument("plan", help="pruning plan JSON file")
    p.add_argument("out", help="output folder (written atomically)")
    p.set_defaults(func=cmd_apply)
    p = sub.add_parser("show", help="print the plan and per-layer structure of a model")
    p.add_argument("model")
    p.add_argument("--removal-map", metavar="PNG", help="also draw which sublayers were removed, in order (PNG)")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("verify", help="reload a saved model in a fresh process without hf_pruning")
    p.add_argument("model")
    p.set_defaults(func=cmd_verify)
    return parser


def _silence_tqdm(cls) -> None:
    """Force ``disable=True`` on every progress bar, also where a library passes ``disable=`` itself."""
    if getattr(cls.__init__, "_hf_pruning_quiet", False):
        return
    original = cls.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    quiet_init._hf_pruning_quiet = True
    cls.__init__ = quiet_init


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    method = None
    if "--method" in argv and argv.index("--method") + 1 < len(argv):
        method = argv[argv.index("--method") + 1]
    try:
        parser = build_parser(method)
    except KeyError as err:
        sys.stderr.write(f"hf-prune: error: {err.args[0]}\n")
        return 2
    args = parser.parse_args(argv)
    if args.quiet:  # no progress bars either (ours, transformers', lm-eval's: all tqdm)
        import tqdm
        from transformers.utils import logging as hf_logging

        _silence_tqdm(tqdm.tqdm)

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from hf_pruning.config import ConfigError
    from hf_pruning.plan import PlanError

    try:
        return args.func(args)
    except (PlanError, ConfigError, ValueError, FileNotFoundError, OSError, ImportError) as err:
        sys.stderr.write(f"hf-prune: error: {err}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
