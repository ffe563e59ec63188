"""`isynth` command line: train, sample, eval, flops, pairs, compare.

A command picks a preset and overrides fields with `section.field=value` arguments (e.g.
`model.width=64 sample.cfg_scale=3`). Any bad input ends with one line on stderr and exit status 2;
training that diverges (a non-finite loss or gradient norm) with one line and exit status 3.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path

import click
import torch
from click.core import ParameterSource

from isynth import __version__
from isynth.claimcommand import claim as claim_command
from isynth.compare import DEFAULT_NUM_PAIRS, run_compare
from isynth.config import DataConfig, RunConfig, TokenizerConfig
from isynth.configdoc import describe, format_rows
from isynth.configfile import config_overrides
from isynth.data import load_dataset
from isynth.errors import IsynthError
from isynth.eval.command import METRICS_OPTION, WEIGHTS_OPTION, weights_for
from isynth.eval.command import fid as fid_command
from isynth.eval.command import score as score_command
from isynth.eval.run_eval import MIN_SAMPLES, evaluate_run
from isynth.export import dataset as dataset_commands
from isynth.figures import loss_curves
from isynth.flopsreport import flops_report
from isynth.hardware import init_distributed
from isynth.hub import export as export_command
from isynth.hub import is_exported, load_exported, record_command
from isynth.latents import tokenize as tokenize_dataset
from isynth.overrides import apply, budget_overrides, dataset_overrides, parse_overrides
from isynth.pairs import generate_pairs
from isynth.paradigms import paradigm_class
from isynth.presets import make_run
from isynth.runs import balanced_labels, load_trained, parse_attrs, parse_labels, read_run_config
from isynth.samplefiles import sample_to_file
from isynth.sweepcommand import command_line
from isynth.sweepcommand import report as report_command
from isynth.sweepcommand import sweep as sweep_command
from isynth.tokenizers.build import build_tokenizer
from isynth.tokenizers.command import tokenizer as tokenizer_commands
from isynth.tokenizers.store import read_manifest as read_tokenizer_manifest
from isynth.trainer import train as run_training

OVERRIDES = click.argument("overrides", nargs=-1, metavar="[SECTION.FIELD=VALUE]...")
CONFIG_FILE = click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
                           help="JSON, YAML or TOML settings (e.g. a run's config.json), applied before the "
                                "SECTION.FIELD=VALUE overrides.")


def _file_overrides(config_file: Path | None, paradigm: str) -> list[str]:
    return config_overrides(config_file, paradigm) if config_file is not None else []


def _sampling(run: RunConfig, overrides: tuple[str, ...], cfg_scale: float | None, kv_cache: bool | None):
    """The run's sampling config with command-line changes applied (`sample.` prefix optional)."""
    items = [o if o.startswith("sample.") else f"sample.{o}" for o in overrides]
    changes: dict[str, object] = {k.removeprefix("sample."): v for k, v in parse_overrides(items).items()}
    if cfg_scale is not None:
        if not paradigm_class(run.paradigm).guided:
            raise IsynthError(f"paradigm {run.paradigm!r} has no guidance (--cfg-scale)")
        changes["guidance.scale"] = cfg_scale
    if kv_cache is not None:
        changes["kv_cache"] = kv_cache
    return apply(run.sample, changes, "sample.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="isynth", message="%(prog)s %(version)s")
def cli():
    """isynth: transformer image-generation paradigms on one backbone, compared at equal compute."""


@cli.command()
@click.argument("paradigm")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Run directory (re-running resumes; another --steps or --flops extends the run).")
@click.option("--dataset", default=None,
              help="digits (default), shapes, a path to an .npz (arr_0 uint8 NHWC, labels), folder:PATH or "
                   "latents:DIR.")
@click.option("--preset", default="cpu", show_default=True,
              help="tiny, cpu, rar-b|l|xl|xxl, mar-b|l|h, emigm-xs|s|b|l|h, fluid-166m|369m|665m|1.1b, get-t|m|s|b|b+.")
@click.option("--steps", type=int, default=None, help="Training budget in optimizer steps.")
@click.option("--flops", type=float, default=None, help="Training budget in training FLOPs (e.g. 1e13).")
@click.option("--shuffle-pairs", is_flag=True,
              help="get only: train on randomly re-paired (noise, image) pairs, the control of GET's claim.")
@click.option("--init-from", "init_from", type=click.Path(path_type=Path), default=None,
              help="A new run that starts from this run's EMA weights (fine-tuning; same paradigm and tensor "
                   "shapes, e.g. on another dataset); resume it without --init-from.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@CONFIG_FILE
@OVERRIDES
def train(paradigm, out, dataset, preset, steps, flops, shuffle_pairs, init_from, quiet, config_file, overrides):
    """Train PARADIGM (ar, rar, maskgit, mdm, mar, ar-cont, diffusion, get) into --out."""
    if shuffle_pairs and paradigm != "get":
        raise IsynthError(f"--shuffle-pairs is a control for get's teacher pairs; {paradigm!r} has none")
    shuffle = ["method.shuffle_pairs=true"] if shuffle_pairs else []
    run = make_run(paradigm, preset, [*_file_overrides(config_file, paradigm), *dataset_overrides(dataset),
                                      *budget_overrides(steps, flops), *shuffle, *overrides])
    run_training(run, out, progress=not quiet, init_from=init_from)
    record_command(out, command_line())  # for the model card of `isynth export`
    if not quiet:
        click.echo(f"trained {paradigm} -> {out}")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--num-samples", type=int, default=100, show_default=True)
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Output .npz (a .png grid is written beside it).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cfg-scale", type=float, default=None, help="Guidance weight g (1 = no CFG).")
@click.option("--kv-cache/--no-kv-cache", default=None, help="Incremental decoding with the KV cache.")
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of the EMA weights.")
@click.option("--attrs", default=None,
              help='Only classes with these attributes, e.g. "shape=circle colour=red" (the others cycle through '
                   'their values; digits: "class=3").')
@click.option("--labels", "label_list", default=None,
              help="Class ids, one per sample, e.g. 3,3,7 (sets --num-samples; not with --attrs).")
@click.option("--shard-size", type=int, default=1000, show_default=True,
              help="Images per shard: memory is bounded by one shard, and a killed run resumes at its first "
                   "missing one.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@OVERRIDES
def sample(run_dir, num_samples, out, seed, cfg_scale, kv_cache, no_ema, attrs, label_list, shard_size, quiet,
           overrides):
    """Generate class-conditional samples from RUN_DIR; labels (class ids) cycle through every combination of
    the attributes (digits: the classes), or through those that match --attrs, or are given by --labels.
    Under `torchrun --nproc_per_node N -m isynth sample ...` the processes share the shards; the file is the
    one a single process writes with the same seed."""
    if label_list is not None and attrs is not None:
        raise IsynthError("give --labels or --attrs, not both")
    asked_count = click.get_current_context().get_parameter_source("num_samples") != ParameterSource.DEFAULT
    if num_samples <= 0:
        raise IsynthError(f"--num-samples must be > 0, got {num_samples}")
    if shard_size < 1:
        raise IsynthError(f"--shard-size must be >= 1, got {shard_size}")
    if out.suffix != ".npz":
        raise IsynthError(f"--out must be an .npz file, got {out}")
    if out.is_dir():
        raise IsynthError(f"--out {out} is a directory; give a file name ending in .npz")
    rank, _ = init_distributed()
    model, dataset, _ = (load_exported if is_exported(run_dir) else load_trained)(run_dir, use_ema=not no_ema)
    s = _sampling(model.run, overrides, cfg_scale, kv_cache)
    if label_list is not None:
        labels, asked = parse_labels(label_list, dataset.conditions.num_classes), {}
        if asked_count and num_samples != len(labels):
            raise IsynthError(f"--labels gives {len(labels)} class ids (one per sample) but --num-samples is "
                              f"{num_samples}; give one of them, or as many ids as samples")
        num_samples = len(labels)
    elif attrs is None:
        labels, asked = balanced_labels(num_samples, dataset.conditions), {}
    else:
        try:
            fixed = parse_attrs(attrs, dataset.conditions)
        except IsynthError as e:
            raise IsynthError(f"--attrs: {e}") from None
        labels = balanced_labels(num_samples, dataset.conditions, fixed)
        asked = {"attrs": {dataset.conditions.names[k]: dataset.conditions.values[k][v] for k, v in fixed.items()}}
    written = sample_to_file(model, run_dir, labels, s, out, seed=seed, shard_size=shard_size, use_ema=not no_ema,
                             progress=not quiet)
    if rank == 0:
        click.echo(json.dumps({**written, "sample_flops_per_image": model.sample_flops(s),
                               "sampling": dataclasses.asdict(s), **asked}))


@cli.command(name="eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--num-samples", type=int, default=None, help="Default: the run's train.eval_num_samples.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cfg-scale", type=float, default=None, help="Guidance weight g (1 = no CFG).")
@click.option("--no-ema", is_flag=True, help="Evaluate the raw weights instead of the EMA weights.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@METRICS_OPTION
@WEIGHTS_OPTION
@OVERRIDES
def evaluate(run_dir, num_samples, seed, cfg_scale, no_ema, quiet, metrics, inception_weights, overrides):
    """Sample RUN_DIR, score the samples, write RUN_DIR/metrics.json and print it."""
    if num_samples is not None and num_samples < MIN_SAMPLES:
        raise IsynthError(f"--num-samples must be >= {MIN_SAMPLES}, got {num_samples}")
    weights = weights_for(metrics, inception_weights)
    # Only the config is needed here; evaluate_run loads the weights once.
    s = _sampling(read_run_config(run_dir), overrides, cfg_scale, None)
    click.echo(json.dumps(evaluate_run(run_dir, num_samples, s, seed, use_ema=not no_ema, inception_weights=weights,
                                       progress=not quiet), indent=2))


@cli.command()
@click.argument("paradigm")
@click.option("--preset", default="cpu", show_default=True)
@click.option("--dataset", default=None, help="'digits' (default) or an .npz path; sets the token grid.")
@click.option("--seq-len", type=int, default=None,
              help="Token count instead of the dataset's (e.g. 256 for ImageNet VQ f16).")
@click.option("--vocab-size", type=int, default=None, help="Codebook size with --seq-len (e.g. 1024).")
@click.option("--num-classes", type=int, default=None, help="Classes with --seq-len (e.g. 1000).")
@click.option("--token-dim", type=int, default=None,
              help="Continuous token size with --seq-len (default 16, MAR's KL-16 latents).")
@OVERRIDES
def flops(paradigm, preset, dataset, seq_len, vocab_size, num_classes, token_dim, overrides):
    """Print parameters and training / sampling FLOPs of PARADIGM at a preset as JSON."""
    click.echo(json.dumps(flops_report(paradigm, preset, [*dataset_overrides(dataset), *overrides],
                                       seq_len, vocab_size, num_classes, token_dim), indent=2))


@cli.command()
@click.argument("paradigm")
@click.option("--preset", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per field instead of a table.")
@CONFIG_FILE
@OVERRIDES
def config(paradigm, preset, as_json, config_file, overrides):
    """Print every configuration field of PARADIGM at a preset (with overrides applied): its value, type and
    help. Any field can be set as SECTION.FIELD=VALUE on train, sample, eval and the other commands."""
    rows = describe(make_run(paradigm, preset, [*_file_overrides(config_file, paradigm), *overrides]))
    if as_json:
        click.echo("\n".join(json.dumps(r, default=str) for r in rows))
    else:
        click.echo(format_rows(rows))


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", default=None, type=click.Path(path_type=Path),
              help="Output stem (STEM.png and STEM.svg); default RUN/loss for one run.")
def plot(runs, out):
    """Draw the training loss of one or more RUNS against training FLOPs (overlaid)."""
    if out is None:
        if len(runs) > 1:
            raise IsynthError("several runs need --out STEM (where to write STEM.png and STEM.svg)")
        out = runs[0] / "loss"
    out = out.with_suffix("") if out.suffix in (".png", ".svg") else out
    for path in loss_curves(runs, out):
        click.echo(str(path))


@cli.command()
@click.argument("teacher_run", type=click.Path(path_type=Path))
@click.option("--num-pairs", type=int, required=True, help="Total pairs wanted in --out (more than it holds appends).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Pair directory (re-running resumes).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shard-size", type=int, default=1024, show_default=True, help="Pairs per shard file.")
@click.option("--no-ema", is_flag=True, help="Use the teacher's raw weights instead of its EMA weights.")
@click.option("--quiet", is_flag=True)
@OVERRIDES
def pairs(teacher_run, num_pairs, out, seed, shard_size, no_ema, quiet, overrides):
    """Generate (noise, image) pairs with TEACHER_RUN's deterministic sampler, for `get` (method.pairs=DIR)."""
    s = _sampling(read_run_config(teacher_run), overrides, None, None)
    m = generate_pairs(teacher_run, num_pairs, out, s, seed=seed, shard_size=shard_size, use_ema=not no_ema,
                       progress=not quiet)
    click.echo(json.dumps({"out": str(out), "num_pairs": m["num_pairs"], "shards": len(m["shards"]),
                           "teacher": m["teacher"]["run_dir"], "teacher_step": m["teacher"]["step"],
                           "sample_flops_per_pair": m["teacher_sample_flops_per_pair"], "nfe": m["nfe"],
                           "seconds": round(sum(sh["seconds"] for sh in m["shards"]), 2)}))


@cli.command()
@click.option("--dataset", default=None, help="digits (default), shapes, an .npz path or folder:PATH.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Latents directory (re-running resumes).")
@click.option("--shard-size", type=int, default=4096, show_default=True, help="Images per shard file.")
@click.option("--quiet", is_flag=True)
@click.argument("overrides", nargs=-1, metavar="[tokenizer.FIELD=VALUE | data.FIELD=VALUE]...")
def tokenize(dataset, out, shard_size, quiet, overrides):
    """Encode a dataset's training split once with a tokenizer (e.g. tokenizer.path=DIR); train on the cache
    with --dataset latents:OUT and the same tokenizer settings."""
    parsed = parse_overrides([*dataset_overrides(dataset), *overrides])
    bad = [k for k in parsed if not k.startswith(("tokenizer.", "data."))]
    if bad:
        raise IsynthError(f"isynth tokenize takes tokenizer.* and data.* settings, not {bad[0]}")
    if parsed.get("data.name") == "latents":
        raise IsynthError("isynth tokenize encodes images; latents are already tokens")
    data_cfg = apply(DataConfig(), {k.removeprefix("data."): v for k, v in parsed.items() if k.startswith("data.")},
                     "data.")
    tok = {k.removeprefix("tokenizer."): v for k, v in parsed.items() if k.startswith("tokenizer.")}
    if "path" in tok and "kind" not in tok:
        tok["kind"] = read_tokenizer_manifest(tok["path"])["kind"]
    tokenizer_cfg = apply(TokenizerConfig(), tok, "tokenizer.")
    dataset_ = load_dataset(data_cfg)
    tokenizer = build_tokenizer(tokenizer_cfg, dataset_.image_shape)
    tokenizer.check_data(dataset_.train_images)
    m = tokenize_dataset(tokenizer, tokenizer_cfg, data_cfg, dataset_, out, shard_size, progress=not quiet)
    click.echo(json.dumps({"out": str(out), "num_tokens": m["num_tokens"], "shards": len(m["shards"]),
                           "seq_len": m["seq_len"], "token_dim": m["token_dim"], "moments": m["moments"],
                           "seconds": round(sum(s["seconds"] for s in m["shards"]), 2)}))


@cli.command()
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Directory for runs, table and grids.")
@click.option("--paradigms", default=None, help="Comma-separated subset (default: all implemented).")
@click.option("--preset", default="cpu", show_default=True)
@click.option("--flops", "train_flops", type=float, default=None,
              help="Training FLOPs per paradigm (default: the main job's).")
@click.option("--num-pairs", type=int, default=None, help="Teacher pairs for get (default: 2048).")
@click.option("--dataset", default=None,
              help="digits (default; fixed tokenizers), or shapes, an .npz or folder:PATH: a discrete (FSQ) and a "
                   "continuous (KL) tokenizer are trained first.")
@click.option("--seeds", type=int, default=1, show_default=True,
              help="Train each paradigm with this many seeds; the table shows mean and 95% CI.")
@click.option("--quiet", is_flag=True)
@OVERRIDES
def compare(out, paradigms, preset, train_flops, num_pairs, dataset, seeds, quiet, overrides):
    """The main job: train every paradigm on digits at the same training FLOPs, evaluate, tabulate."""
    names = paradigms.split(",") if paradigms else None
    data = [] if dataset in (None, "digits") else dataset_overrides(dataset)
    if data and data[0] == "data.name=latents":
        raise IsynthError("isynth compare trains its own tokenizers: give the images (shapes, an .npz, folder:PATH)")
    run_compare(out, names, preset, train_flops, list(overrides), progress=not quiet,
                num_pairs=DEFAULT_NUM_PAIRS if num_pairs is None else num_pairs, data=data, seeds=seeds,
                command=command_line())


cli.add_command(dataset_commands)
cli.add_command(sweep_command)
cli.add_command(report_command)
cli.add_command(claim_command)
cli.add_command(tokenizer_commands)
cli.add_command(fid_command)
cli.add_command(score_command)
cli.add_command(export_command)

# click >= 8.2 raises this for a bare `isynth`; older versions print the help and exit 0 themselves.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _error(message: object) -> None:
    """The one stderr line of a failed command (embedded newlines, e.g. from a file's bytes, folded)."""
    click.echo(f"isynth: error: {' '.join(str(message).split())}", err=True)


class Stopped(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's pre-emption, `kill`, torchrun stopping its workers), unwound
    like any exception so that temporary files are removed, locks released and the last checkpoint kept. Not
    a KeyboardInterrupt, which click would turn into Abort after printing an empty line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame) -> None:
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, _stop) for sig in handled}  # restored below for in-process callers
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        cli.main(args=args, prog_name="isynth", standalone_mode=False, obj={"argv": args})
    except _NO_ARGS_IS_HELP as e:  # bare `isynth`: the help, as with --help
        click.echo(e.ctx.get_help())
        return 0
    except IsynthError as e:
        _error(e)
        return e.exit_code
    except OSError as e:  # an unusable path (a file where a directory must be, no permission), a full disk
        _error(e)
        return 2
    except (MemoryError, torch.OutOfMemoryError) as e:
        _error(f"out of memory ({type(e).__name__}: {str(e)[:200]}); lower train.batch_size or sample.batch_size")
        return 2
    except Stopped as e:
        click.echo("isynth: interrupted" if e.signum == signal.SIGINT else "isynth: terminated (SIGTERM)", err=True)
        return 128 + e.signum  # as a shell reports a process the signal ended: 130, 143
    except (click.exceptions.Abort, KeyboardInterrupt):  # Ctrl-C where no handler could be set (a thread)
        click.echo("isynth: interrupted", err=True)
        return 130
    except RuntimeError as e:  # after Abort, which is one
        if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
            raise
        _error(f"out of memory ({str(e)[:200]}); lower train.batch_size or sample.batch_size")
        return 2
    except click.ClickException as e:
        _error(e.format_message())
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
