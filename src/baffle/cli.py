"""Command line: ``baffle train | plot | compare | list``.

Every ``TrainConfig`` field is a flag (``batch_size`` -> ``--batch-size``); a TOML file
given with ``--config`` sets values first and flags override it. Errors print one line
``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from baffle.config import METHODS, MODES, SEED_SHARING, SPLITS, TrainConfig, from_dict, load_toml
from baffle.errors import BaffleError, ConfigError

HELP = {
    "method": f"baffle, or a backprop baseline: {', '.join(METHODS)}",
    "mode": f"{' | '.join(MODES)}: one server step per round, or one local epoch per round "
            "(uploads K scalars per local step; the server replays them)",
    "dataset": "data set name (see `baffle list`)",
    "data_dir": "folder holding the data set's files",
    "download": "download the data set into the cache if it is missing",
    "model": "lenet or wrn-D-W (e.g. wrn-10-2)",
    "norm": "group (affine-free GroupNorm) | none | batch (backprop only)",
    "activation": "hardswish | relu | selu | gelu",
    "clients": "number of clients C",
    "split": f"{' | '.join(SPLITS)}",
    "alpha": "Dirichlet concentration for --split dirichlet (smaller = more skew)",
    "shards_per_client": "shards per client for --split shards",
    "val_per_class": "validation examples held out per class (-1 = data set default)",
    "participation": "fraction of clients sampled each round",
    "clients_per_round": "exact number of clients sampled each round (overrides participation)",
    "min_clients": "fewest valid uploads a round needs; with fewer the model stays unchanged",
    "K": "number of perturbation directions per estimate",
    "K_milestones": "epochs at which K changes to the matching --K-values entry, e.g. 5,10",
    "K_values": "K from each --K-milestones epoch on, e.g. 50,100 (a K schedule)",
    "sigma": "perturbation scale: delta_k = sigma * eps_k",
    "scheme": "forward: d = L(W+delta) - L(W), K+1 passes; central: L(W+delta) - L(W-delta), 2K",
    "seed_sharing": f"{' | '.join(SEED_SHARING)}: one seed per round for all clients "
                    "(secure-aggregation compatible) or one per client (C*K directions)",
    "perturb": "all: every direction moves every weight (the paper) | layer: direction k moves "
               "only layer k mod L (or per --layer-cycle), and each layer averages its own "
               "directions",
    "layer_cycle": "with --perturb layer: direction k moves layer c[k mod len(c)] (layers "
                   "numbered from the input: LeNet 0 conv1, 1 conv2, 2 classifier), e.g. "
                   "0,1,2,1,1,1,0,1,2,1 gives conv2 60 of every 100 directions (default "
                   "0,1,...,L-1: equal shares)",
    "sampler": "how directions are drawn: torch (a generator per direction and tensor) | "
               "counter (a hash of the entry's index: one batch per tensor, for GPUs)",
    "engine": "batched (K perturbed models as one grouped pass) | delta (batched, each "
              "perturbed conv computing only its O(sigma) change from the unperturbed pass, in "
              "bfloat16: faster on CPUs with AMX; rounding of about 1% of the differences' mean "
              "size against float64, as float32's on LeNet) | sequential (one functional copy at a time) | inplace (perturb the "
              "weights in place, exact restore: inference memory) | vmap | auto (batched if it "
              "fits --max-memory, else inplace)",
    "chunk": "perturbed models per batched forward pass (batched, vmap; auto takes at most 2 "
             "and delta at most 4 on a CPU, and as many as fit --max-memory on a GPU)",
    "max_memory": "memory budget for the estimator's scratch, e.g. 512MiB or 2GiB "
                  "(auto = a quarter of the free memory); chunks K to fit",
    "guide_dims": "r > 0: the server backprops on its own labelled held-out images each round "
                  "and every direction lies in the top r principal directions of its last "
                  "--guide-history gradients (sent to clients every --guide-refresh rounds; "
                  "not in the paper; `baffle train` only) | 0: directions move every weight",
    "guide_history": "with --guide-dims: the server gradients (one a round) the basis is "
                     "computed from",
    "guide_refresh": "with --guide-dims: rounds between new bases (each one a 4*d*r-byte "
                     "download)",
    "guide_images": "with --guide-dims: the server's labelled images, the first N of the "
                    "validation split (its val metrics then include them)",
    "guide_solve": "with --guide-dims: the server rebuilds the gradient's part in the span "
                   "by least squares over the K measurements (exact for K > r as sigma -> 0) "
                   "instead of their Monte Carlo mean (true/false; needs K > --guide-dims)",
    "epochs": "training length in epochs (a FedSGD epoch = the smallest client's batches)",
    "rounds": "training length in rounds (overrides --epochs)",
    "batch_size": "local mini-batch size",
    "local_steps": "epoch mode: local steps per round (0 = one local epoch)",
    "optimizer": "adam | adamw | sgd (stock torch.optim)",
    "lr": "learning rate",
    "betas": "Adam betas, e.g. 0.9,0.99",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay",
    "clip": "rescale the estimate so that max|g| <= clip (0 = off)",
    "lr_milestones": "epochs at which lr is multiplied by --lr-gamma, e.g. 60,120",
    "lr_gamma": "lr decay factor at each milestone",
    "warmup_lr": "first-epoch lr (-1 = authors' rule: 0.02 except on MNIST/digits; 0 = off)",
    "ema": "evaluate an EMA of the weights (true/false)",
    "ema_decay": "EMA decay d, with warm-up min(d, (1+t)/(10+t)) at update t",
    "ema_every": "epoch: one EMA update per epoch (the authors') | round: one per round, "
                 "averaging about 1/(1-d) rounds",
    "seed": "run seed: data split, init, directions, sampling",
    "device": "cpu or cuda",
    "client_optimizer": "local epochs (epoch mode, bp-fedavg): fresh (a new local optimizer "
                        "each round) | keep (each client's optimizer state carries over)",
    "eval_every": "rounds between evaluations (0 = once per epoch)",
    "checkpoint_every": "rounds between checkpoints",
    "keep_every": "also keep the checkpoint of every N-th epoch's end in RUN_DIR/kept/, so "
                  "that --branch-epoch can start a branch there (0 = keep none)",
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error instead of the usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag] if f.name != "K" else ["--K", "--k"]
        p.add_argument(*names, dest=f.name, default=None, metavar=f.name.upper(),
                       help=f"{HELP.get(f.name, '')} (default: {_show(f.default)})")


def _epoch(v: str) -> int:
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"an epoch number >= 1 (got {v!r})")
    return int(v)


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="baffle", description=(
        "Backpropagation-free federated learning (BAFFLE, Feng et al. 2023): clients run "
        "forward passes only and upload K loss differences."))
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a federated model (or resume a run)")
    t.add_argument("--config", help="TOML file with config keys (flags override it)")
    t.add_argument("--out", help="run directory to write (default: runs/<method>-<dataset>-<time>)")
    t.add_argument("--resume", metavar="RUN_DIR", help=(
        "continue the run in RUN_DIR; flags may lengthen it, change schedules from the first "
        "epoch it has not trained, or change cadences (checked like --branch)"))
    t.add_argument("--branch", metavar="RUN_DIR", help=(
        "start a new run (--out) from RUN_DIR's last checkpoint: the flags change RUN_DIR's "
        "config, and only in length and schedules it has not reached yet; exact, as if "
        "trained from round 0"))
    t.add_argument("--branch-epoch", metavar="E", type=_epoch, help=(
        "with --branch: start from the checkpoint RUN_DIR kept at the end of epoch E "
        "(RUN_DIR trained with --keep-every) instead of its last one"))
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(t)
    pl = sub.add_parser("plot", help="PNG curves of accuracy and loss for one or more runs")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png of the first run)")
    c = sub.add_parser("compare", help="print the summary table of several runs side by side")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR")
    sub.add_parser("list", help="list data sets, models, partitioners and optimizers")
    return p


class ProgressBar:
    """A tqdm bar over rounds with the latest loss and accuracy."""

    def __init__(self, quiet: bool) -> None:
        self.bar: Any = None
        self.quiet = quiet

    def on_round(self, record: dict[str, Any], total_rounds: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total_rounds, initial=record["round"], unit="round",
                            file=sys.stderr, dynamic_ncols=True)
        post = {}
        if record.get("train_loss") is not None:
            post["loss"] = f"{record['train_loss']:.3f}"
        if "test_top1" in record:
            post["test"] = f"{record['test_top1']:.2f}%"
        if record["rejected"]:
            post["rejected"] = record["rejected"]
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_train(args: argparse.Namespace) -> int:
    from baffle.rundir import RunDir
    from baffle.simulator import summary_table, train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    config: TrainConfig | None
    if args.resume:
        if args.config or args.branch or args.branch_epoch:
            raise ConfigError("--resume continues the run's saved config; drop --config, "
                              "--branch and --branch-epoch")
        out, resume = Path(args.resume), True
        # flags change the saved config where a branch could (checked when it resumes)
        config = from_dict(overrides, base=RunDir(out).config()) if overrides else None
    else:
        if args.branch_epoch and not args.branch:
            raise ConfigError("--branch-epoch names an epoch of the --branch run; add --branch")
        if args.branch and not args.out:
            raise ConfigError("--branch needs --out, the new run's directory")
        if args.branch and Path(args.out).resolve() == Path(args.branch).resolve():
            raise ConfigError("--out must name a new directory, not the --branch run")
        values = load_toml(args.config) if args.config else {}
        base = RunDir(args.branch).config() if args.branch else None
        config = from_dict({**values, **overrides}, base=base)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(args.out or f"runs/{config.method}-{config.dataset}-{stamp}")
        resume = False
        if args.overwrite and out.exists():
            shutil.rmtree(out)
    bar = ProgressBar(args.quiet)
    try:
        result = train(config, run_dir=out, resume=resume, callbacks=[bar],
                       branch_from=args.branch, branch_epoch=args.branch_epoch)
    finally:
        bar.close()
    print(summary_table([result.summary]))
    print(f"run directory: {out}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from baffle.plot import plot_runs

    path = plot_runs([Path(r) for r in args.runs], Path(args.out) if args.out else None)
    print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from baffle.simulator import summary_table

    summaries = []
    for r in args.runs:
        p = Path(r) / "summary.json"
        if not p.is_file():
            raise ConfigError(f"{r} has no summary.json: is it a finished run directory?")
        summaries.append(json.loads(p.read_text()))
    print(summary_table(summaries))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from baffle.data import available_datasets
    from baffle.data.partition import PARTITIONERS
    from baffle.models import available_models
    from baffle.server import OPTIMIZERS

    print("datasets:    ", ", ".join(available_datasets()))
    print("models:      ", ", ".join(available_models()))
    print("splits:      ", ", ".join(PARTITIONERS))
    print("optimizers:  ", ", ".join(OPTIMIZERS))
    print("methods:     ", ", ".join(METHODS))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    commands = {"train": cmd_train, "plot": cmd_plot, "compare": cmd_compare, "list": cmd_list}
    try:
        return commands[args.command](args)
    except BaffleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with `baffle train --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
