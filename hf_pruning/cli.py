"""``hf-prune``: the command line. Parsing only; every action calls the public API.

    hf-prune prune MODEL OUT --method NAME [method flags] [--calib SOURCE ...]   prune, save into OUT
    hf-prune eval MODEL [--ppl SOURCE] [--tasks ...] [--speed]                  evaluate, print JSON
    hf-prune apply MODEL PLAN.json OUT      apply a hand-written plan, save into OUT
    hf-prune inspect MODEL [--json] [--plots DIR]   plan, per-layer shapes, sparsity and savings of a model
    hf-prune push MODEL REPO_ID [--dry-run]  upload a saved folder to the Hub (one commit, card included)
    hf-prune recover MODEL OUT [--data SRC]  LoRA recovery fine-tuning, masks kept, merged and saved
    hf-prune verify MODEL                   reload MODEL in a fresh process without hf_pruning (runs its code)
    hf-prune export MODEL OUT --format gguf|vllm   for llama.cpp / vLLM, without remote code
    torchrun --nproc_per_node N -m hf_pruning.cli prune ...   data parallel: rows split, one save (rank 0)

Saving into OUT writes the model's files (each whole, staged inside OUT) and keeps every other file there; only
out-of-date files of an earlier save go. Method flags come from the method's config dataclass (``hf-prune prune
--method NAME --help`` lists them). Exit codes: 0 success, 1 a check failed, 2 bad input (the message says how to fix it).
The benchmark and the reference cards are not in the package (``make bench`` / ``make cards`` in a clone).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .cli_args import add_config_arguments, at_least, config_from_args, input_windows, silence_tqdm
from .export.command import add_export_command

logger = logging.getLogger("hf_pruning.cli")


def _check_out(out: str) -> None:
    from hf_pruning.saving import check_save_directory

    check_save_directory(out)


def _load(path: str, args=None):
    """``path`` loaded with ``prune_`` bound; ``args.max_memory``/``args.offload_folder`` (prune): offloaded by
    accelerate (``device_map="auto"``), for models bigger than memory."""
    import hf_pruning

    max_memory = getattr(args, "max_memory", None)
    if not max_memory:
        return hf_pruning.from_pretrained(path)
    from .engine.streaming import offload_settings

    limits = dict(item.split("=", 1) for item in max_memory.split(","))
    gpus = {int(k): v for k, v in limits.items() if k != "cpu"}
    folder = args.offload_folder or args.out + ".offload"
    return hf_pruning.from_pretrained(path, **offload_settings(limits.get("cpu", "8GiB"), folder, gpus))


def cmd_apply(args) -> int:
    import hf_pruning

    _check_out(args.out)  # a bad output path fails now, not after the work
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


def _inspect_text(model, summary: dict) -> str:
    """The human-readable report of ``hf-prune inspect``."""
    import hf_pruning

    plan = hf_pruning.get_plan(model)
    s = summary
    lines = [
        f"class: {type(model).__name__}",
        f"methods: {', '.join(m or '?' for m in s['methods']) or '(none recorded)'}",
        f"plan: {len(plan)} op(s)" + (": " + ", ".join(sorted({op.name for op in plan.ops})) if plan.ops else ""),
        f"layers: {s['layers']['before']} -> {s['layers']['after']}",
        f"parameters: {s['params']['before']:,} -> {s['params']['after']:,} "
        f"(decoder layers -{s['params_removed_fraction']:.2%})",
        f"KV cache per token (bf16): {s['kv_bytes_per_token']['before']:,} -> {s['kv_bytes_per_token']['after']:,} "
        f"bytes (-{s['kv_removed_fraction']:.2%})",
        f"zero weights in decoder linears: {s['sparsity']:.2%}",
        "",
        f"{'layer':>5} {'attention':>10} {'q':>3} {'kv':>3} {'mlp':>5} {'width':>6} {'params':>11} {'sparsity':>8}",
    ]
    for row in s["per_layer"]:
        lines.append(f"{row['layer']:>5} {row['attention']:>10} {row['q_heads']:>3} {row['kv_heads']:>3} "
                     f"{row['mlp']:>5} {row['mlp_width']:>6} {row['params']:>11,} {row['sparsity']:>8.2%}")
    return "\n".join(lines) + "\n"


def cmd_inspect(args) -> int:
    import hf_pruning

    model = _load(args.model)
    summary = hf_pruning.pruning_summary(model)
    if args.json:
        out = {"class": type(model).__name__, "parameters": hf_pruning.parameter_count(model),
               "pruning_plan": hf_pruning.get_plan(model).to_dict(),
               "pruning_config": getattr(model.config, "pruning_config", None),
               "summary": {k: v for k, v in summary.items() if k != "per_layer"},
               "layers": summary["per_layer"], "sparsity": hf_pruning.sparsity_report(model)}
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        sys.stdout.write(_inspect_text(model, summary))
    if args.plots:
        from pathlib import Path

        from hf_pruning.publish import plots

        folder = Path(args.plots)
        folder.mkdir(parents=True, exist_ok=True)
        written = [plots.removal_map(model, folder / "removal_map.png", title=args.model),
                   plots.sparsity_plot(model, folder / "sparsity.png", title=args.model)]
        sys.stderr.write("plots: " + ", ".join(str(p) for p in written) + "\n")
    if args.removal_map:
        from hf_pruning.publish.plots import removal_map

        removal_map(model, args.removal_map, title=f"{args.model}")
    return 0


def cmd_push(args) -> int:
    from hf_pruning.publish.hub import push_folder

    out = push_folder(args.model, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                      commit_message=args.commit_message, create_pr=args.create_pr, endpoint=args.endpoint,
                      dry_run=args.dry_run, base_model=args.base_model)
    if args.dry_run:
        sys.stdout.write(f"dry run: would upload {len(out['files'])} files to {args.repo_id}: "
                         f"{', '.join(out['files'])}\n")
    else:
        sys.stdout.write(f"pushed {args.model} to {args.repo_id}: {getattr(out, 'commit_url', out)}\n")
    return 0


def cmd_recover(args) -> int:
    import hf_pruning
    from hf_pruning.calibration import evaluation_windows, load_text
    from hf_pruning.recovery import RecoveryConfig

    config = config_from_args(RecoveryConfig, args)
    _check_out(args.out)  # a bad output path fails now, not after the work
    model = _load(args.model, args)
    tokenizer = _tokenizer(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; recovery trains on text and needs one")
    eval_ids = None
    if args.eval:
        eval_ids = evaluation_windows(tokenizer, load_text(args.eval), args.eval_seq_len, args.eval_windows)
    report = hf_pruning.recover_(model, args.data, tokenizer=tokenizer, config=config, eval_ids=eval_ids)
    evaluation = None
    if eval_ids is not None:
        evaluation = {"ppl": report["ppl_after"], "ppl_before_recovery": report["ppl_before"],
                      "ppl_text": args.eval, "ppl_tokens": int(eval_ids.numel())}
    hf_pruning.save_pretrained(model, args.out, tokenizer=tokenizer, evaluation=evaluation)
    keep = ("targets", "masked_targets", "trained_tokens", "train_s", "loss_first", "loss_last", "ppl_before", "ppl_after")
    sys.stdout.write(json.dumps({k: report[k] for k in keep if k in report}, indent=2) + "\n")
    return 0


def cmd_verify(args) -> int:
    import torch

    from hf_pruning.publish.verify import reload_in_fresh_process

    model = _load(args.model)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    expected_gen = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    out = reload_in_fresh_process(args.model, ids, max_new_tokens=8)
    checks = {
        "identical logits": torch.equal(out["logits"], expected),
        "default forward (cache on) agrees": torch.allclose(out["logits_default"], expected, atol=1e-4, rtol=0),
        "one-token steps through the cache agree": torch.allclose(out["logits_stepwise"], expected, atol=1e-4,
                                                                  rtol=0),
        "generate with/without cache agree": torch.equal(out["generated"], out["generated_no_cache"]),
        "generate matches the model in this process": torch.equal(out["generated"], expected_gen),
    }
    sys.stdout.write(f"reloaded as {out['class']} without hf_pruning: "
                     + ", ".join(f"{name}={ok}" for name, ok in checks.items()) + "\n")
    return 0 if all(checks.values()) else 1


def cmd_prune(args) -> int:
    import hf_pruning
    from hf_pruning.calibration import build_calibration

    spec = hf_pruning.get_method(args.method)
    config = config_from_args(spec.config_class, args)
    _check_out(args.out)  # a bad output path fails now, not after the work
    model = _load(args.model, args)
    tokenizer = _tokenizer(args.model)

    def windows(n_samples: int, seq_len: int):
        """``n_samples`` windows of ``seq_len`` tokens of ``--calib``."""
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer; calibration text cannot be tokenized")
        return build_calibration(tokenizer, source=args.calib, n_samples=n_samples, seq_len=seq_len, seed=args.seed,
                                 max_length=getattr(model.config, "max_position_embeddings", None))

    inputs = input_windows(spec.config_class, args, windows)  # e.g. compensation_calibration
    calibration = None
    if spec.needs_calibration and config.calibration_required(inputs):  # e.g. HARP with given alphas needs none
        calibration = windows(args.n_samples, args.seq_len)
    where = {k: v for k, v in (("activations_dir", args.activations_dir), ("checkpoint_dir", args.checkpoint_dir)) if v}
    hf_pruning.prune_(model, config, calibration=calibration, **inputs, **where)
    hf_pruning.save_pretrained(model, args.out, tokenizer=tokenizer)
    sys.stdout.write(f"saved {type(model).__name__} pruned with {args.method} to {args.out}\n")
    return 0


def cmd_eval(args) -> int:
    import hf_pruning
    from hf_pruning.calibration import evaluation_windows, load_text
    from hf_pruning.evaluation import measure_speed, perplexity, zero_shot

    model = _load(args.model, args)
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


def _tokenizer(path: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        logger.warning("no tokenizer found next to %s", path)
        return None


OUT_HELP = ("output folder, created when missing; the model's files are written into it (each one whole) and its other "
            "files are kept")
#: subcommands that left the package, and where they went (the benchmark lives in the repository, not installed)
MOVED = {
    "bench": "the benchmark is not installed with hf_pruning; in a clone of the repository run `make bench` "
             "(or `python -m benchmarks.run [--quick]`)",
    "cards": "the reference model cards are built by the repository's benchmark, not the installed package; in a "
             "clone run `make cards` (or `python -m benchmarks.cards`)",
}
VERIFY_HELP = ("reload a saved model in a fresh process without hf_pruning and compare logits and generation. This RUNS "
               "THE PYTHON CODE IN THE FOLDER (transformers' trust_remote_code=True): use it only on folders you trust")


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-prune", description="Prune Hugging Face causal LMs in place.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="prune a model with a registered method and save the result")
    p.add_argument("model", help="model folder or Hub name")
    p.add_argument("out", help=OUT_HELP)
    p.add_argument("--method", required=True, help="registered method (see --list-methods)")
    p.add_argument("--calib", default="default:calibration",
                   help="calibration text: file, folder, 'default[:calibration]', 'wikitext2', 'c4' or 'hf:<dataset>'")
    p.add_argument("--n-samples", type=at_least(1), default=16, help="calibration windows")
    p.add_argument("--seq-len", type=at_least(2), default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-memory", help="load offloaded: memory for weights per device, e.g. 'cpu=8GiB,0=20GiB' "
                   "(the rest on disk in --offload-folder)")
    p.add_argument("--offload-folder", help="where offloaded weights' edits go (default: OUT.offload)")
    p.add_argument("--activations-dir", help="keep calibration activations in files there instead of memory")
    p.add_argument("--checkpoint-dir", help="record finished layers there; rerun the same command to resume")
    if method is not None:
        import hf_pruning

        add_config_arguments(p, hf_pruning.get_method(method).config_class)
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("eval", help="perplexity, zero-shot accuracy and speed of a model (JSON on stdout)")
    p.add_argument("model")
    p.add_argument("--ppl", help="evaluation text (same sources as --calib); omit to skip perplexity")
    p.add_argument("--windows", type=at_least(1), default=32, help="windows of --seq-len tokens (32 x 512 = 16k tokens)")
    p.add_argument("--seq-len", type=at_least(2), default=512, help="tokens per evaluation window")
    p.add_argument("--tasks", default="", help="comma-separated zero-shot tasks: social_iqa, wikihow_goal_inference, "
                   "a path to a .jsonl file of {question, choices, label} lines, or an lm-eval task name; "
                   "a :acc or :acc_norm suffix picks the reported metric")
    p.add_argument("--limit", type=at_least(1), default=300, help="items per task (the first N)")
    p.add_argument("--speed", action="store_true", help="prefill/decode tokens per second and KV bytes per token")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("apply", help="apply a pruning plan (JSON file) and save the result")
    p.add_argument("model", help="model folder or Hub name")
    p.add_argument("plan", help="pruning plan JSON file")
    p.add_argument("out", help=OUT_HELP)
    p.set_defaults(func=cmd_apply)
    p = sub.add_parser("inspect", help="print the plan, per-layer shapes, sparsity and savings of a saved model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="everything as JSON (plan, settings, summary, sparsity)")
    p.add_argument("--plots", metavar="DIR", help="also write removal_map.png and sparsity.png into DIR")
    p.add_argument("--removal-map", metavar="PNG", help="also draw which sublayers were removed, in order (PNG)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("show", help="the same as inspect --json (kept for scripts)")
    p.add_argument("model")
    p.add_argument("--removal-map", metavar="PNG", help="also draw which sublayers were removed, in order (PNG)")
    p.set_defaults(func=cmd_inspect, json=True, plots=None)
    p = sub.add_parser("push", help="upload a saved model folder to the Hub (weights, code, card in one commit)")
    p.add_argument("model", help="saved model folder")
    p.add_argument("repo_id", help="namespace/name on the Hub")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    p.add_argument("--private", action=argparse.BooleanOptionalAction, default=None, help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to push to (created when missing)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--base-model", default=None, help="the base model's Hub id, for the card's metadata")
    p.add_argument("--endpoint", default=None, help="another Hub endpoint (default: huggingface.co or HF_ENDPOINT)")
    p.add_argument("--dry-run", action="store_true", help="build the files and list them; upload nothing")
    p.set_defaults(func=cmd_push)
    p = sub.add_parser("recover", help="LoRA recovery fine-tuning of a pruned model (masks kept), merged and saved")
    p.add_argument("model", help="pruned model folder")
    p.add_argument("out", help=OUT_HELP)
    p.add_argument("--data", default="default:calibration", help="training text (same sources as prune --calib)")
    p.add_argument("--eval", default=None, help="evaluation text for perplexity before/after (e.g. default:evaluation)")
    p.add_argument("--eval-windows", type=at_least(1), default=16)
    p.add_argument("--eval-seq-len", type=at_least(2), default=512)
    from hf_pruning.recovery import RecoveryConfig

    add_config_arguments(p, RecoveryConfig)
    p.set_defaults(func=cmd_recover)
    add_export_command(sub)
    p = sub.add_parser("verify", help=VERIFY_HELP, description=VERIFY_HELP + ".")
    p.add_argument("model", help="saved model folder (its *.py files are executed)")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in MOVED:
        sys.stderr.write(f"hf-prune: error: `hf-prune {command}` moved: {MOVED[command]}\n")
        return 2
    method = None
    if "--method" in argv and argv.index("--method") + 1 < len(argv):
        method = argv[argv.index("--method") + 1]
    try:
        parser = build_parser(method)
    except KeyError as err:
        sys.stderr.write(f"hf-prune: error: {err.args[0]}\n")
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # argparse printed its usage and error (code 2), or --help (code 0)
        return done.code if isinstance(done.code, int) else 2
    from hf_pruning.engine.distributed import init_for_cli

    if init_for_cli():  # under torchrun: rank 0 alone prints, shows progress and saves
        args.quiet = True
    if args.quiet:  # no progress bars either (ours, transformers', lm-eval's: all tqdm)
        import tqdm
        from transformers.utils import logging as hf_logging

        silence_tqdm(tqdm.tqdm)

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from hf_pruning.config import ConfigError
    from hf_pruning.plan import PlanError
    from hf_pruning.publish.hub import HubPushError

    try:
        return args.func(args)
    except HubPushError as err:
        sys.stderr.write(f"hf-prune: push failed: {err}\n")
        return 1
    except (PlanError, ConfigError, ValueError, FileNotFoundError, OSError, ImportError) as err:
        sys.stderr.write(f"hf-prune: error: {err}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
