"""``lowprec gan``: the DCGAN experiment of MPT and Park et al. on MNIST (wiring only; experiments/gan.py)."""

from __future__ import annotations

from pathlib import Path

from .argtypes import count, positive, seed


def add_parser(sub) -> None:
    """Register ``gan`` on the subparsers ``sub``."""
    from ..experiments.gan import DEFAULT_GAN_RECIPES, GanSettings

    d = GanSettings()
    p = sub.add_parser("gan", help="train a DCGAN on MNIST under several recipes: sample grids, FID-like scores")
    p.add_argument("--recipes", nargs="+", default=DEFAULT_GAN_RECIPES,
                   help="presets, PRESET+key=value,..., policy strings or .toml files (default: fp32, MPT's fp16 "
                   "without loss scaling, Park's INT8 GAN recipe without and with the lazy update)")
    p.add_argument("--epochs", type=count, default=d.epochs)
    p.add_argument("--batch-size", type=count, dest="batch_size", default=d.batch_size)
    p.add_argument("--lr", type=positive, default=d.lr, help=f"Adam's learning rate for G and D (default {d.lr:g}; "
                   f"betas {d.betas}, eps {d.eps:g}: Park et al.'s GAN settings)")
    p.add_argument("--train-limit", type=count, dest="train_limit", help="use the first N training images")
    p.add_argument("--samples", type=count, default=d.samples,
                   help=f"generated images scored per recipe, against as many test images (default {d.samples})")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--data-root", dest="data_root", help="data folder (default $LOWPREC_DATA or ~/.cache/lowprec, "
                   "then the MNIST subset shipped with lowprec)")
    p.add_argument("--out", help="output folder (default runs/gan-mnist)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out (each recipe "
                   "from its last finished epoch; finished recipes are read back; --epochs may be raised)")
    p.add_argument("--overwrite", action="store_true", help="replace the runs in --out")
    p.set_defaults(func=cmd_gan)


def cmd_gan(args) -> int:
    from rich.console import Console

    from ..experiments.gan import GanSettings, gan_experiment, load_gan_data
    from ..experiments.validate import check_device
    from .main import _progress_factory, _recipes

    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the runs in --out, or replace them")
    check_device(args.device)
    recipes = _recipes(args.recipes)
    settings = GanSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, samples=args.samples)
    settings.check()
    console = Console()
    data = load_gan_data(args.data_root, args.train_limit)
    out = Path(args.out or "runs/gan-mnist")
    console.print(f"[bold]gan[/]: DCGAN on MNIST (MPT: fp16 without loss scaling; Park et al.: INT8 with and "
                  f"without the lazy update)\ndata: {data.source}; {settings.epochs} epochs of batch "
                  f"{settings.batch_size}; Adam lr {settings.lr:g} betas {settings.betas} eps {settings.eps:g}; "
                  f"seed {args.seed}; output {out}/" + ("; resuming" if args.resume else ""))

    def on_scorer(scorer) -> None:
        console.print(f"scoring classifier: fp32 LeNet, {scorer.accuracy:.2f} % test accuracy")

    results = gan_experiment(recipes, data, settings, seed=args.seed, out_dir=out, resume=args.resume,
                             overwrite=args.overwrite, progress_factory=_progress_factory(console),
                             on_scorer=on_scorer, device=args.device)
    _print_scores(console, out)
    diverged = [r.recipe for r in results if r.diverged_epoch is not None]
    if diverged:
        console.print(f"diverged (non-finite loss): {', '.join(diverged)}")
    console.print(f"table: {out / 'scores.csv'}   grids: {out / 'samples.png'}   losses: {out / 'losses.png'}")
    return 0


def _print_scores(console, out: Path) -> None:
    import csv

    from rich.table import Table

    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    table = Table(title="DCGAN on MNIST: last epoch (fid: FID-like, LeNet features; lower is better)")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
