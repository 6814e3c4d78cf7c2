"""`sftjax train|data|plan|ablate|generate|export|convert`: parse, load the config, dispatch. Thin on purpose.

User mistakes (UserError) print one `error: ...` line and exit with status 2, no traceback. In a
multi-process run (`train --distributed`), losing another process (dead, or never joined within
SFTJAX_TIMEOUT_S) prints one `error: ...` line naming it and exits with status 75; see
parallel/distributed.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sftjax.errors import Interrupted, UserError

log = logging.getLogger("sftjax")
CHECKPOINT_HELP = ("which checkpoint: latest | best (checkpoint.best_metric's) | a step number | auto "
                   "(default: best after an early stop, else latest)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sftjax", description="Supervised fine-tuning in JAX.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fine-tune (resumes from the latest checkpoint in --workdir)")
    t.add_argument("--config", required=True, help="configs/NAME.py; override keys with --config.a.b=value")
    t.add_argument("--workdir", required=True)
    t.add_argument("--distributed", action="store_true",
                   help="join a multi-process run: jax.distributed.initialize() from SFTJAX_COORDINATOR, "
                        "SFTJAX_NUM_PROCESSES, SFTJAX_PROCESS_ID if set, else auto-detected (SLURM, TPU pods); "
                        "SFTJAX_TIMEOUT_S (default 300) bounds the wait for a missing process (exit 75)")
    st = sub.add_parser("selftrain", help="self-training (task.type=classification): a teacher on a labelled "
                                          "fraction pseudo-labels the rest for a student, selftrain.rounds times; "
                                          "writes WORKDIR/selftrain.json")
    st.add_argument("--config", required=True, help="configs/NAME.py; override keys with --config.a.b=value")
    st.add_argument("--workdir", required=True, help="round-K/ per round, its data as round-K.jsonl, heldout.jsonl")
    d = sub.add_parser("data", help="look at the training data as the step sees it")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    i = dsub.add_parser("inspect", help="per-source counts and N examples with the trained tokens highlighted")
    i.add_argument("--config", required=True, help="configs/NAME.py; override keys with --config.a.b=value")
    i.add_argument("-n", type=int, default=3, help="examples to show per source")
    g = sub.add_parser("generate", help="reply to prompts with the fine-tuned model of a workdir")
    g.add_argument("--workdir", required=True)
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", help="user message; print the reply (repeatable)")
    what.add_argument("--prompts", metavar="FILE.jsonl",
                      help='one {"prompt": ...} or {"messages": [...]} per line; writes --output')
    what.add_argument("--chat", action="store_true", help="interactive: one user turn per stdin line, "
                                                          "until EOF or /exit")
    g.add_argument("--output", metavar="FILE.jsonl", help="--prompts: each input line plus \"output\" "
                                                          "(default: standard output)")
    g.add_argument("--system", help="system message placed before each prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: all)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="end the reply before this text (repeatable)")
    g.add_argument("--batch-size", type=int, default=8, help="--prompts: prompts decoded together")
    g.add_argument("--base", action="store_true", help="use the base model, ignoring the checkpoint")
    g.add_argument("--checkpoint", default="auto", help=CHECKPOINT_HELP)
    e = sub.add_parser("export", help="write a merged HF folder (config, safetensors, tokenizer) or a PEFT adapter")
    e.add_argument("--workdir", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    e.add_argument("--format", choices=("merged", "peft"), default="merged",
                   help="merged: a full HF model folder; peft: adapter_config.json + adapter_model.safetensors")
    e.add_argument("--checkpoint", default="auto", help=CHECKPOINT_HELP)
    ev = sub.add_parser("eval", help="every score of a workdir's checkpoint on held-out data (loss, perplexity, "
                                     "generation ROUGE-L/BLEU; classification report and confusion matrix; "
                                     "entity F1; general-data perplexity); writes WORKDIR/eval.json")
    ev.add_argument("--workdir", required=True)
    ev.add_argument("--checkpoint", default="auto", help=CHECKPOINT_HELP)
    ev.add_argument("--data", help="held-out data file (default: the run's own held-out split)")
    ev.add_argument("--generate", type=int, default=32, metavar="N",
                    help="causal_lm: score greedy replies to the first N held-out conversations (0: off)")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--forgetting", metavar="SOURCE",
                    help="general data (e.g. recipe:chitchat) to compare perplexity before and after "
                         "(default: the run's data.forgetting)")
    pl = sub.add_parser("plan", help="per-device memory of a training step on each mesh, before loading or compiling")
    pl.add_argument("--config", required=True, help="configs/NAME.py; override keys with --config.a.b=value; "
                                                    "model.path may be a folder holding only a config.json")
    pl.add_argument("--devices", type=int, help="plan for N devices (default: this machine's)")
    pl.add_argument("--device-memory", help="memory per device, e.g. 16GiB or 80GB: which meshes fit "
                                            "(default: the device's own limit, where it reports one)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.add_argument("--no-compile", action="store_true",
                    help="skip the comparison with XLA's compiled step (made when the devices are present)")
    ab = sub.add_parser("ablate", help="one config over several mesh layouts, each in its own process: a table "
                                       "of step time, tokens/s, MFU, compile time, peak memory and final loss")
    ab.add_argument("--config", required=True, help="configs/NAME.py; override keys with --config.a.b=value")
    ab.add_argument("--meshes", required=True, help='layouts as DATA,FSDP,TENSOR separated by spaces: "8,1,1 2,2,2"')
    ab.add_argument("--steps", type=int, default=10, help="training steps per layout (the first includes compilation)")
    ab.add_argument("--workdir", required=True, help="one subfolder (and TensorBoard run) per layout, plus the tables")
    c = sub.add_parser("convert", help="GGUF file -> HF folder")
    c.add_argument("--gguf", required=True, help="a .gguf file, or smollm2-135m-instruct for the embedded model")
    c.add_argument("--out", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # model and data are local paths: never reach the network
    overrides = [a for a in argv if a.startswith("--config.")]
    args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
    # The console shows sftjax's own lines: libraries say only errors (set a variable to hear more).
    # The variables act when the libraries first load (lazily, below); the loggers' levels at once.
    for var, level in (("TRANSFORMERS_VERBOSITY", "error"), ("TF_CPP_MIN_LOG_LEVEL", "2"), ("GRPC_VERBOSITY", "ERROR")):
        os.environ.setdefault(var, level)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax", "orbax", "transformers", "grain", "tensorboardX", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    sys.unraisablehook = _quiet_unraisable
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines go above the training progress bar, not into it
            return _dispatch(args, overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # the checkpoint is saved: a clean, resumable stop
        print(f"stopped: {e}", file=sys.stderr)
        return 0


def _quiet_unraisable(unraisable) -> None:
    """Exceptions Python can only ignore (a library's coroutine failing as it is collected, e.g. Orbax
    reading a broken checkpoint that sftjax has already reported) go to the debug log, not the console."""
    try:
        log.debug("ignored in %r: %r", unraisable.object, unraisable.exc_value)
    except Exception:  # noqa: BLE001 - at interpreter shutdown logging may be gone: stay silent
        pass


def _load_workdir(workdir: str, which: str = "auto"):
    """(config, Setup, step, trained params) of a finished or interrupted run's checkpoint `which`
    (latest | best | STEP | auto: best after an early stop, else latest)."""
    from sftjax.build import build
    from sftjax.data.templates import resolve
    from sftjax.train.checkpoint import trainable_at
    from sftjax.train.workdir import RESULTS, read_config, read_json

    cfg = read_config(workdir)
    stopped = (read_json(os.path.join(workdir, RESULTS)) or {}).get("stopped", "")
    setup = build(cfg)
    if setup.head is None:  # generate with the template training used (task heads read raw text)
        resolve(setup.tokenizer, cfg.data.chat_template)
    step, trainable = trainable_at(workdir, setup, cfg, which, prefer_best=stopped.startswith("early stopping"))
    log.info("%s: checkpoint step %d", workdir, step)
    return cfg, setup, step, trainable


def _train(args, overrides) -> int:
    from sftjax.config import load_config

    cfg = load_config(args.config, overrides)  # a config mistake fails before the training stack imports
    from sftjax.train.loop import run

    if not args.distributed:
        run(cfg, args.workdir)
        return 0
    from sftjax.parallel.distributed import initialize

    watch = initialize()
    try:
        run(cfg, args.workdir)
    except Interrupted:  # every process got the signal and saved the checkpoint together
        watch.done()
        raise
    except BaseException as e:
        watch.fail(e)  # tells the other processes and exits; they would wait for this one otherwise
    watch.done()
    return 0


def _selftrain(args, overrides) -> int:
    from sftjax.config import load_config

    cfg = load_config(args.config, overrides)  # a config mistake fails before the training stack imports
    from sftjax.train.selftrain import selftrain

    selftrain(cfg, args.workdir)
    return 0


def _data(args, overrides) -> int:
    from sftjax.config import load_config
    from sftjax.data.inspect import inspect

    print(inspect(load_config(args.config, overrides), args.n, "ansi" if sys.stdout.isatty() else "brackets"))
    return 0


def _plan(args, overrides) -> int:
    import json

    from sftjax.config import load_config
    from sftjax.parallel.plan import device_memory, format_report, parse_bytes, report

    cfg = load_config(args.config, overrides)
    budget = parse_bytes(args.device_memory) if args.device_memory else device_memory()
    r = report(cfg, args.devices, budget, compile=not args.no_compile)
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0


def _ablate(args, overrides) -> int:
    from sftjax.config import load_config
    from sftjax.parallel.ablate import ablate, parse_meshes

    load_config(args.config, overrides)  # a bad config fails once here, not once per layout
    if args.steps < 2:
        raise UserError("--steps: at least 2 (the first step includes compilation and is not timed)")
    return ablate(args.config, overrides, parse_meshes(args.meshes), args.steps, args.workdir)


def _convert(args) -> int:
    from sftjax.io.hf import write_hf_folder
    from sftjax.io.load import load_pretrained

    cfg, params, tok = load_pretrained(args.gguf)
    write_hf_folder(args.out, cfg, params, tok)
    print(f"wrote {args.out}")
    return 0


def _generate(args) -> int:
    from sftjax.infer import prompts as prompt_file
    from sftjax.infer.converse import converse
    from sftjax.infer.generate import chat
    from sftjax.infer.sample import Sampling

    # Everything the flags can get wrong fails here, before the model loads.
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed, tuple(args.stop))
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise UserError("--max-new-tokens and --batch-size: at least 1")
    if args.output and not args.prompts:
        raise UserError("--output: only with --prompts")
    items = prompt_file.read_prompts(args.prompts, args.system) if args.prompts else None
    if args.output:
        prompt_file.check_output(args.output)
    cfg, setup, step, trainable = _load_workdir(args.workdir, args.checkpoint)
    params = setup.full_params(None if args.base else trainable)
    if items is not None:
        rows = prompt_file.reply_all(setup.model, params, setup.tokenizer, items, args.max_new_tokens, sampling,
                                     args.batch_size)
        prompt_file.write_outputs(args.output, rows)
        if args.output:
            log.info("wrote %d replies to %s", len(rows), args.output)
        return 0
    if args.chat:
        lines = iter(lambda: input("> "), None) if sys.stdin.isatty() else sys.stdin
        try:
            converse(setup.model, params, setup.tokenizer, lines, args.max_new_tokens, sampling, args.system,
                     lambda reply: print(f"{reply}\n", flush=True))
        except EOFError:  # Ctrl-D at the prompt
            pass
        return 0
    system = [{"role": "system", "content": args.system}] if args.system else []
    convs = [system + [{"role": "user", "content": p}] for p in args.prompt]
    replies = chat(setup.model, params, setup.tokenizer, convs, args.max_new_tokens, sampling)
    if len(args.prompt) == 1:
        print(replies[0])
    else:
        for prompt, reply in zip(args.prompt, replies, strict=True):
            print(f"> {prompt}\n{reply}\n")
    return 0


def _check_exportable(workdir: str, fmt: str) -> None:
    """Refuse, from the run's config alone, what `export` cannot write: a BERT classification head
    as a merged folder (`io.bert.SEQ_CLS_REFUSAL`), and PEFT adapters of an encoder."""
    from sftjax.io.bert import SEQ_CLS_REFUSAL
    from sftjax.io.load import is_encoder
    from sftjax.train.workdir import read_config

    cfg = read_config(workdir)
    if not is_encoder(cfg.model.path):
        return
    if fmt == "peft":
        raise UserError("--format=peft: PEFT names exist for decoder layers only; export this encoder run with "
                        "--format=merged")
    if cfg.task.type == "classification":
        raise UserError(SEQ_CLS_REFUSAL)


def _export(args) -> int:
    import jax
    import numpy as np

    from sftjax.io.hf import write_hf_folder
    from sftjax.train.workdir import check_writable

    check_writable(args.out, "--out")  # before the model loads
    _check_exportable(args.workdir, args.format)  # before the model loads too
    cfg, setup, step, trainable = _load_workdir(args.workdir, args.checkpoint)
    if args.format == "peft":
        from sftjax.peft.export import write_adapter

        if not cfg.lora.enabled:
            raise UserError("--format=peft: this run trained without LoRA (lora.enabled=False); use --format=merged")
        write_adapter(args.out, cfg.lora, trainable, setup.model_cfg.num_hidden_layers, cfg.model.path,
                      dtype=args.dtype, head=setup.head)
    else:
        merged = jax.tree.map(np.asarray, setup.merged_params(trainable))
        write_hf_folder(args.out, setup.model_cfg, merged, setup.tokenizer, dtype=args.dtype, head=setup.head)
    print(f"wrote {args.out}")
    return 0


def _eval(args) -> int:
    if args.generate < 0 or args.max_new_tokens <= 0:
        raise UserError("--generate must be >= 0 and --max-new-tokens positive")
    if args.data and not os.path.exists(args.data):
        raise UserError(f"--data: {args.data} not found")
    from sftjax.data import pipeline
    from sftjax.train.metrics import Writer
    from sftjax.train.report import report
    from sftjax.train.workdir import write_json

    cfg, setup, step, trainable = _load_workdir(args.workdir, args.checkpoint)
    cfg.unlock()
    if args.data:
        cfg.data.eval = args.data
    if args.forgetting is not None:
        cfg.data.forgetting = args.forgetting
    cfg.lock()
    data = pipeline.load(cfg, setup.tokenizer, setup.head)
    if data.eval is None:
        raise UserError("--data: this run has no held-out split (data.eval_fraction=0); name a file with --data")
    writer = Writer(args.workdir)
    try:
        out, text = report(cfg, setup, data, trainable, step, writer, args.generate, args.max_new_tokens)
    finally:
        writer.close()
    out = {"checkpoint": step, "data": args.data or cfg.data.eval or "held-out split", **out}
    write_json(os.path.join(args.workdir, "eval.json"), out)
    print(text)
    return 0


def _dispatch(args, overrides: list[str]) -> int:
    if args.cmd in ("plan", "ablate"):
        return (_plan if args.cmd == "plan" else _ablate)(args, overrides)
    if args.cmd in ("train", "data"):
        return (_train if args.cmd == "train" else _data)(args, overrides)
    if args.cmd == "selftrain":
        return _selftrain(args, overrides)
    if overrides:
        raise UserError(f"{overrides[0]}: --config.* overrides apply to `train`, `data`, `plan`, `ablate` and "
                        "`selftrain` only")
    return {"convert": _convert, "generate": _generate, "export": _export, "eval": _eval}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
