"""Config schema, loading, command-line overrides, and the one place configs are validated.

A config file is Python with `get_config()` returning an ml_collections ConfigDict built on
`base_config()`. The result is locked: an unknown key, in the file or in `--config.a.b=value`,
raises naming the key (with a did-you-mean hint) instead of being silently ignored.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os

from ml_collections import ConfigDict

from sftjax.data.formats import FORMATS
from sftjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
# Logical axis -> mesh axes. batch/length/heads/kv/mlp also name activation dimensions (the
# model pins its layer inputs, attention heads and MLP hidden units with them).
MESH_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
    "classes": (),  # a task head's outputs (classification, token classification): few, replicated
}
# train.evaluate's (loss/SOURCE too); accuracy and macro_f1 with task.type=classification, f1
# (entity level) with token_classification.
EVAL_METRICS = ("loss", "perplexity", "token_accuracy", "exact_match", "accuracy", "macro_f1", "f1")
REMAT = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload")


def base_config() -> ConfigDict:
    """Every key sftjax reads, with its default. Config files start from this."""
    c = ConfigDict()
    c.model = dict(
        path="smollm2-135m-instruct",  # HF folder, .gguf file, or the embedded default's name
        dtype="float32",  # compute dtype: float32 or bfloat16 (master weights stay float32)
        # Rematerialisation of each decoder layer in the backward pass (see docs/scaling.md and
        # docs/performance.md for measured time and memory): none | full (keep only layer inputs) |
        # dots_saveable (keep matmul outputs) | dots_with_no_batch_dims_saveable (the default: keep
        # the weight matmuls' outputs and attention's log-normaliser, recompute attention scores
        # and elementwise ops; no weight matmul is recomputed, and 8x256 LoRA on all linear layers
        # keeps 1.34 instead of 3.17 GiB) | offload (as the
        # last, but kept in host memory; backends with pinned host memory).
        remat="dots_with_no_batch_dims_saveable",
        # True: layers stacked under one `layers` subtree and run with nn.scan (fast compile).
        # False: unrolled into layers_0..layers_{L-1} (needed by train.freeze=last_layers; same math).
        scan_layers=True,
        # QLoRA: store the frozen decoder-layer kernels blockwise-quantised (64 values per absmax
        # scale) and dequantise them inside each matmul: none | nf4 (4-bit NormalFloat) | int8.
        quantize="none",
    )
    c.data = dict(
        train="",  # data source (see below), or recipe:NAME (see sftjax/data/recipes.py)
        # Several sources with sampling weights, e.g. (("recipe:trec", 0.8), ("recipe:chitchat", 0.2));
        # replaces data.train. Each source's loss is reported separately.
        mixture=(),
        eval="",  # held-out source; empty: eval_fraction of train (a recipe brings its own held-out split)
        eval_fraction=0.05,
        # Sources: .jsonl .json .csv .tsv .parquet files, CoNLL column files (.conll/.bio), a folder
        # written by datasets' save_to_disk, or hf:LOADER:FILE (datasets.load_dataset over a local file).
        # Record format: auto | messages | sharegpt | alpaca | prompt_completion | text |
        # classification | tokens (token classification: tokens + BIO tags). auto detects it from the fields.
        format="auto",
        labels=(),  # classification / NER label set; a label outside it is an error naming the record
        instruction="",  # system prompt for classification / NER records rendered as chat
        chat_template="model",  # model (the tokenizer's) | chatml | llama-3 | alpaca | path to a .jinja file
        loss_on="assistant",  # assistant (every reply) | last_assistant | all (every token)
        max_length=256,  # tokens per example after the chat template
        truncation="right",  # right (cut the end) | left (cut the start) | drop (drop longer examples)
        min_tokens=0,  # drop examples shorter than this (0: no limit)
        on_no_targets="drop",  # drop (and count) | raise: an example left without target tokens
        dedup="exact",  # none | exact (normalised text hash) | near (MinHash LSH, also exact)
        near_dup_threshold=0.85,  # Jaccard similarity of 5-gram shingles above which records are duplicates
        quality=("empty", "repetition"),  # filters: empty/whitespace replies, runaway repetition
        packing=False,  # pack several examples per row (segment ids; attention never crosses examples)
        buckets=3,  # without packing: pad each batch to one of this many lengths (compiles <= this many times)
        num_shards=0,  # data shards (0: one per process); fix it to keep the data order across host counts
        max_eval_examples=256,
        seed=0,
        # A general-data source (e.g. recipe:chitchat) whose perplexity is measured at every
        # evaluation, before and after training, to see how much the model forgot ("": off).
        # The first 256 records of its held-out split (a recipe's) or of the source are used.
        forgetting="",
    )
    # What is trained: causal_lm (next-token loss on the targets, e.g. assistant replies) |
    # classification (a linear head over data.labels on one position per example) |
    # token_classification (a per-token head over BIO tags of the types in data.labels; the first
    # sub-token of each word is labelled, the rest ignored). See docs/tasks.md.
    c.task = dict(
        type="causal_lm",
        # Where a classification head reads: auto (decoder: the last non-pad token; encoder: the
        # first, [CLS]) | last | first | mean (mean of the tokens; encoders only).
        pooling="auto",
        class_weights=(),  # one loss weight per data.labels entry (imbalanced data); () = all 1
        balance_classes=False,  # weights n / (k * count) from the training data (instead of class_weights)
    )
    c.lora = dict(
        enabled=True,
        rank=8,
        alpha=16.0,  # scale = alpha / rank (alpha / sqrt(rank) with rslora), rank per module
        dropout=0.0,
        targets=("qv",),  # presets qv | attention | all_linear, or regexes over module paths
        rslora=False,
        # ((module regex, rank), ...): first match sets that module's rank, e.g. (("mlp/", 16),)
        rank_overrides=(),
        dora=False,  # DoRA: also learn a magnitude per output column (weight-decomposed LoRA)
        init_from="",  # a PEFT adapter folder to start from (e.g. `sftjax export --format=peft` output)
    )
    # Prompt tuning (prompt: `length` learned virtual tokens in front of every sequence) or prefix
    # tuning (prefix: `length` learned keys/values in every layer, P-tuning v2). Only these train;
    # needs lora.enabled=False.
    c.prompt_tuning = dict(method="none", length=16)
    c.train = dict(
        steps=100,
        batch_size=8,  # global batch (examples per optimizer step, across devices and micro-batches)
        grad_accum=1,  # micro-batches per step; the loss is normalised over the whole global batch
        # Without LoRA, which parameters train: full (all) | last_layers (the last train.last_layers
        # layers + final norm + head; needs model.scan_layers=False) | head (final norm + head) |
        # regex (train.trainable). The trainable count and % are logged at start.
        freeze="full",
        last_layers=2,
        trainable=(),  # with train.freeze=regex: regexes (re.search) over parameter paths
        seed=0,
        eval_every=0,  # 0: evaluate only before and after training
        log_every=1,
        sample_prompts=(),  # user prompts generated before and after training
        sample_eval=0,  # also generate for this many held-out conversations
        sample_max_new_tokens=24,
        neftune_alpha=0.0,  # NEFTune: U(-1,1) * alpha / sqrt(L * d) noise on input embeddings, training only (0: off; 5 is usual)
        fgm_epsilon=0.0,  # FGM: also train on embeddings perturbed by epsilon * g / ||g|| (0: off; ~1 is usual)
        # A step whose loss or gradient is not finite applies no update (checked inside the step).
        # stop: end the run with an error naming the step | skip: go on, and stop after
        # train.max_nonfinite such steps in a row.
        on_nonfinite="stop",
        max_nonfinite=5,
        # SIGTERM/SIGINT finish the step, save and exit 0; past this many seconds the process exits
        # at once (status 143) without a checkpoint. A second signal exits at once (status 130).
        stop_grace_secs=120.0,
    )
    c.optim = dict(
        # adamw | adafactor (factored second moments, little state) | lion (one moment; use a 3-10x lower lr)
        name="adamw",
        lr=2e-4,  # peak; typical: 1e-4..3e-4 with LoRA, 1e-5..5e-5 for full fine-tuning
        b1=0.9, b2=0.999, eps=1e-8,  # betas (adamw, lion) and eps (adamw)
        weight_decay=0.01,  # decoupled, times the lr, off the optim.no_decay paths, for every optimizer
        clip_norm=1.0,
        # Linear warmup (warmup_steps, or warmup_ratio of train.steps when warmup_steps < 0), then
        # cosine | linear (down to lr * min_lr_ratio) | constant.
        schedule="cosine", warmup_steps=-1, warmup_ratio=0.1, min_lr_ratio=0.1,
        no_decay=(r"scale$", r"bias$", r"embedding$"),
    )
    # Device mesh sizes (-1: all remaining devices) and the rules that map each logical axis of
    # parameters and activations to mesh axes, e.g. --config.mesh.rules.embed="()" keeps embeddings
    # unsharded, --config.mesh.rules.mlp="('fsdp','tensor')" splits the MLP both ways.
    c.mesh = dict(data=-1, fsdp=1, tensor=1, rules={k: v for k, v in MESH_RULES.items()})
    c.checkpoint = dict(
        every=50,  # save every N steps (and at the end, on a signal, at every evaluation when best_metric is set)
        every_minutes=0.0,  # also save when this many minutes passed since the last save (0: off)
        max_to_keep=2,  # the latest N checkpoints are kept, plus the best one (checkpoint.best_metric)
        # An eval metric (loss, perplexity, token_accuracy, exact_match, loss/SOURCE) whose best
        # checkpoint is kept beside the latest ones ("": none); export/generate --checkpoint=best.
        best_metric="",
        best_mode="min",  # min | max: which way best_metric improves
    )
    # Early stopping on checkpoint.best_metric (needs train.eval_every > 0): stop when it has not
    # improved by more than min_delta for `patience` evaluations in a row (0: off).
    c.early_stop = dict(patience=0, min_delta=0.0)
    # `sftjax selftrain` (task.type=classification; see sftjax/train/selftrain.py): a teacher trained
    # on a `labelled` fraction (0 < x <= 1, a seeded draw stratified by class) of the training records
    # labels the rest; pseudo-labels with confidence >= `threshold`, at most `per_class` per class
    # (0: as many as the smallest class kept, for balance), most confident first, join the labelled
    # records to train a student from the base model, which teaches the next of `rounds` rounds.
    # Every round trains train.steps steps.
    c.selftrain = dict(labelled=0.01, rounds=3, threshold=0.9, per_class=0, seed=0)
    return c


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> ConfigDict:
    """Run `path`'s get_config(), check it against base_config(), apply overrides, lock."""
    if os.path.isdir(path):
        raise UserError(f"--config: {path} is a folder; give a config file, e.g. configs/quickstart.py")
    if not os.path.isfile(path):
        raise UserError(f"--config: file {path!r} not found")
    spec = importlib.util.spec_from_file_location("_sftjax_user_config", path)
    if spec is None:
        raise UserError(f"--config: {path} is not a Python file; a config is a .py file defining get_config()")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        raise _config_error(path, e) from None
    if not hasattr(mod, "get_config"):
        raise UserError(f"{path}: defines no get_config() function")
    try:
        cfg = mod.get_config()
    except Exception as e:
        raise _config_error(path, e) from None
    if not isinstance(cfg, ConfigDict):
        raise UserError(f"{path}: get_config() returned {type(cfg).__name__}, not the ConfigDict of base_config()")
    check_keys(cfg, base_config(), path)
    cfg = ConfigDict(cfg.to_dict())
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    cfg.lock()
    return cfg


def _config_error(path: str, e: Exception) -> UserError:
    """An exception raised by the user's config file, as `path:line: Type: message` (the line in that
    file, not in ml_collections), e.g. a value of the wrong type assigned to a schema key."""
    import traceback

    mine = os.path.abspath(path)
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == mine]
    where = f"{path}:{lines[-1]}" if lines else path
    return UserError(f"{where}: {type(e).__name__}: {e}")


CHOICES = {
    ("model", "dtype"): ("float32", "bfloat16"),
    ("data", "format"): FORMATS,
    ("data", "loss_on"): ("assistant", "last_assistant", "all"),
    ("data", "truncation"): ("right", "left", "drop"),
    ("data", "on_no_targets"): ("drop", "raise"),
    ("data", "dedup"): ("none", "exact", "near"),
    ("optim", "name"): ("adamw", "adafactor", "lion"),
    ("train", "freeze"): ("full", "last_layers", "head", "regex"),
    ("prompt_tuning", "method"): ("none", "prompt", "prefix"),
    ("optim", "schedule"): ("cosine", "linear", "constant"),
    ("model", "quantize"): ("none", "nf4", "int8"),
    ("model", "remat"): REMAT,
    ("train", "on_nonfinite"): ("stop", "skip"),
    ("checkpoint", "best_mode"): ("min", "max"),
    ("task", "type"): ("causal_lm", "classification", "token_classification"),
    ("task", "pooling"): ("auto", "last", "first", "mean"),
}
POSITIVE = [("train", "steps"), ("train", "batch_size"), ("train", "grad_accum"), ("data", "max_length"),
            ("lora", "rank"), ("optim", "lr"), ("checkpoint", "every"), ("checkpoint", "max_to_keep")]
POSITIVE += [("train", "last_layers"), ("prompt_tuning", "length"), ("train", "max_nonfinite"),
             ("train", "stop_grace_secs")]


def validate(cfg: ConfigDict) -> None:
    """Every check that needs no model, data or devices, run once when a config is loaded
    (`load_config`, `from_json`), so a mistake fails before anything slow starts; the builders
    trust a validated config. Library callers that build a ConfigDict themselves call this."""
    for (sect, key), options in CHOICES.items():
        if cfg[sect][key] not in options:
            raise UserError(f"{sect}.{key}: {cfg[sect][key]!r} is not one of {', '.join(options)}")
    for sect, key in POSITIVE:
        if not cfg[sect][key] > 0:
            raise UserError(f"{sect}.{key}: must be positive, got {cfg[sect][key]}")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise UserError(f"train.batch_size: {cfg.train.batch_size} is not divisible by "
                        f"train.grad_accum={cfg.train.grad_accum}")
    for item in cfg.lora.rank_overrides:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], int) and item[1] > 0):
            raise UserError(f"lora.rank_overrides: each entry must be a (module regex, positive rank) pair, "
                            f"got {item!r}")
    for key in ("neftune_alpha", "fgm_epsilon"):
        if cfg.train[key] < 0:
            raise UserError(f"train.{key}: must be >= 0 (0 turns it off), got {cfg.train[key]}")
    if not 0 <= cfg.lora.dropout < 1:
        raise UserError(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    from sftjax.data.filters import QUALITY

    unknown = [q for q in cfg.data.quality if q not in QUALITY]
    if unknown:
        raise UserError(f"data.quality: unknown filter {', '.join(map(repr, unknown))}; "
                        f"known filters: {', '.join(QUALITY)}")
    _validate_trainable(cfg)
    _validate_task(cfg)
    _validate_rules(cfg.mesh.rules)
    _validate_stopping(cfg)
    _validate_selftrain(cfg.selftrain)


def _validate_selftrain(st) -> None:
    """selftrain.*: a labelled fraction, a confidence threshold, counts."""
    if not (isinstance(st.labelled, (int, float)) and 0 < st.labelled <= 1):
        raise UserError(f"selftrain.labelled: the fraction of training records that keep their labels, "
                        f"0 < x <= 1; got {st.labelled}")
    if not (isinstance(st.threshold, (int, float)) and 0 <= st.threshold <= 1):
        raise UserError(f"selftrain.threshold: a confidence in [0, 1], got {st.threshold}")
    for key, least in (("rounds", 1), ("per_class", 0)):
        if not (isinstance(st[key], int) and st[key] >= least):
            raise UserError(f"selftrain.{key}: an integer >= {least}, got {st[key]!r}")


def _validate_task(cfg: ConfigDict) -> None:
    """Task heads need the label set, and a sequence's label in one place."""
    t = cfg.task
    if t.type == "causal_lm":
        if t.class_weights or t.balance_classes:
            raise UserError("task.class_weights: class weights apply to task.type=classification or "
                            "token_classification, not causal_lm")
        return
    if not cfg.data.labels:
        what = "class names" if t.type == "classification" else "entity types (e.g. PER, LOC)"
        raise UserError(f"task.type={t.type}: needs data.labels, the {what}, e.g. --config.data.labels=a,b")
    if t.class_weights and t.balance_classes:
        raise UserError("task.class_weights: set either class_weights or balance_classes, not both")
    if t.class_weights:
        if t.type != "classification":
            raise UserError("task.class_weights: given per data.labels entry, for task.type=classification; "
                            "use task.balance_classes for token_classification")
        if len(t.class_weights) != len(cfg.data.labels) or not all(
                isinstance(w, (int, float)) and w > 0 for w in t.class_weights):
            raise UserError(f"task.class_weights: needs one positive weight per data.labels entry "
                            f"({len(cfg.data.labels)}), got {tuple(t.class_weights)!r}")
    if cfg.data.packing and t.pooling == "mean":
        raise UserError("task.pooling=mean: averages over the whole row, so it cannot be packed; set data.packing=False")
    if cfg.prompt_tuning.method != "none":
        raise UserError(f"prompt_tuning.method={cfg.prompt_tuning.method}: not with task heads (task.type={t.type})")


def _validate_stopping(cfg: ConfigDict) -> None:
    """Time-based saves, keep-best and early stopping: values that cannot work."""
    for key in ("every_minutes",):
        if cfg.checkpoint[key] < 0:
            raise UserError(f"checkpoint.{key}: must be >= 0 (0 turns it off), got {cfg.checkpoint[key]}")
    if cfg.early_stop.patience < 0 or cfg.early_stop.min_delta < 0:
        raise UserError("early_stop: patience and min_delta must be >= 0, got "
                        f"patience={cfg.early_stop.patience}, min_delta={cfg.early_stop.min_delta}")
    if cfg.early_stop.patience and not cfg.checkpoint.best_metric:
        raise UserError("early_stop.patience: needs the metric to watch; set checkpoint.best_metric "
                        "(e.g. --config.checkpoint.best_metric=loss)")
    best = cfg.checkpoint.best_metric
    if best and best not in EVAL_METRICS and not best.startswith("loss/"):
        raise UserError(f"checkpoint.best_metric: {best!r} is not an eval metric; use one of "
                        f"{', '.join(EVAL_METRICS)} or loss/SOURCE{_hint(best, EVAL_METRICS)}")
    if cfg.checkpoint.best_metric and not cfg.train.eval_every:
        raise UserError(f"checkpoint.best_metric={cfg.checkpoint.best_metric}: evaluations happen only before "
                        "and after training; set train.eval_every (e.g. --config.train.eval_every=50)")


def _validate_rules(rules) -> None:
    """mesh.rules: every value a tuple of distinct mesh axes (unknown logical axes are caught by
    check_keys / apply_override, since the default table is the schema)."""
    for name, axes in rules.items():
        if isinstance(axes, str):
            axes = (axes,)
        if not isinstance(axes, (tuple, list)) or not all(isinstance(a, str) for a in axes):
            raise UserError(f"mesh.rules.{name}: must be a tuple of mesh axes, got {axes!r}")
        for a in axes:
            if a not in MESH_AXES:
                raise UserError(f"mesh.rules.{name}: unknown mesh axis {a!r}; mesh axes are {', '.join(MESH_AXES)}")
        if len(set(axes)) != len(axes):
            raise UserError(f"mesh.rules.{name}: mesh axis listed twice in {tuple(axes)!r}")


def _validate_trainable(cfg: ConfigDict) -> None:
    """What trains: LoRA, prompt/prefix tuning and train.freeze choose it in ways that exclude each other."""
    freeze, trainable = cfg.train.freeze, cfg.train.trainable
    if cfg.lora.enabled and freeze != "full":
        raise UserError(f"train.freeze={freeze}: chooses trainable base parameters without LoRA; "
                        "set lora.enabled=False (with LoRA only the adapters train)")
    if cfg.lora.enabled and trainable:
        raise UserError("train.trainable: chooses trainable base parameters without LoRA; set lora.enabled=False "
                        "and train.freeze=regex (with LoRA only the adapters train)")
    if cfg.prompt_tuning.method != "none" and cfg.lora.enabled:
        raise UserError(f"prompt_tuning.method={cfg.prompt_tuning.method}: trains only the prompt over a frozen "
                        "base; set lora.enabled=False")
    if freeze == "full" and trainable:
        raise UserError("train.trainable: regexes are used with train.freeze=regex (now 'full')")
    if freeze == "regex" and not trainable:
        raise UserError("train.trainable: train.freeze=regex needs at least one regex")
    if freeze == "last_layers" and cfg.model.scan_layers:
        raise UserError("train.freeze=last_layers: needs one subtree per layer; set --config.model.scan_layers=False")


def check_keys(cfg: ConfigDict, schema: ConfigDict, where: str, prefix: str = "") -> None:
    for k in cfg.keys():
        full = f"{prefix}{k}"
        if k not in schema:
            raise UserError(f"{where}: unknown config key {full!r}{_hint(k, schema.keys())}")
        if isinstance(schema[k], ConfigDict):
            check_keys(cfg[k], schema[k], where, f"{full}.")


def _hint(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def apply_override(cfg: ConfigDict, item: str) -> None:
    """`--config.optim.lr=3e-4` (the `--config.` prefix already stripped or not)."""
    item = item.removeprefix("--").removeprefix("config.")
    if "=" not in item:
        raise UserError(f"--config.{item}: expected --config.KEY=VALUE")
    key, raw = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = cfg
    for i, p in enumerate(parents):
        if p not in node or not isinstance(node[p], ConfigDict):
            raise UserError(f"--config.{key}: unknown config key {'.'.join(parents[: i + 1])!r}{_hint(p, node.keys())}")
        node = node[p]
    if leaf not in node:
        raise UserError(f"--config.{key}: unknown config key {key!r}{_hint(leaf, node.keys())}")
    node[leaf] = _parse(raw, node[leaf], key)


def _parse(raw: str, current, key: str):
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if isinstance(current, str):
            return raw
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            if not isinstance(current, tuple):
                raise
            value = tuple(x.strip() for x in raw.split(",") if x.strip())  # --config.lora.targets=q,v
        return tuple(value) if isinstance(current, tuple) and isinstance(value, (list, tuple)) else value
    except (ValueError, SyntaxError):
        kind = type(current).__name__
        raise UserError(f"--config.{key}: {raw!r} is not a valid {kind}") from None


def to_json(cfg: ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, default=list)


def _fill(node: ConfigDict, values: dict) -> None:
    """Copy JSON `values` into `node`, turning lists back into the tuples the schema holds."""
    for k, v in values.items():
        if isinstance(node[k], ConfigDict):
            _fill(node[k], v)
        else:
            node[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(node[k], tuple) else v


def from_json(text: str) -> ConfigDict:
    """A run's saved config (see `train.loop`), validated and locked like `load_config`'s."""
    base = base_config()
    _fill(base, json.loads(text))
    validate(base)
    base.lock()
    return base
