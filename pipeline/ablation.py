"""Table 2's ablation over seeds: every method of every experiment, trained again per seed, mean and spread.

One command (``make ablation``)::

    python -m pipeline.ablation --seeds 0 1 2

For each seed it sets ``train.seed`` in ``params.yaml`` and runs ``dvc repro evaluate``: DVC retrains
every ``train@<experiment>-<method>`` run (the seed draws the model's initial weights and the training
clips) and reruns ``infer`` and ``evaluate``; the data stages and the VAE do not depend on
``train.seed`` and stay cached. Each seed's ``metrics/evaluate.json`` is copied to
``results/ablation/seed<seed>.json``. At the end ``params.yaml`` gets its own bytes back and
``dvc repro`` restores the outputs of its own seed from DVC's run cache.

``results/ablation/ablation.md`` (and ``ablation.json``) then give, per experiment and method, the
mean and the sample standard deviation over the seeds of each metric, and of the paired differences
to the reference ``vae_roundtrip`` (where every restorer starts), to ``latent_mse`` (ChopGrad*, the
latent-only baseline of Table 2) and to the degraded ``input``: a
method's difference in one seed is taken against the same seed's reference, so the spread of a
difference is that of the method and not of the reference. ``input`` and ``vae_roundtrip`` do not
depend on the seed (a check: their spread is 0). A difference whose mean is within one standard
deviation of zero is no finding. ``--aggregate-only`` rebuilds the table from the seed files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["aggregate", "main", "render"]

REFERENCES = ("input", "vae_roundtrip")  # rows that do not depend on train.seed
BASELINES = (*REFERENCES, "latent_mse")  # paired differences against these (latent_mse: ChopGrad*, Table 2's baseline)
METRICS = ("psnr", "ssim")  # what the embedded default's tables hold without weight files
OUT = Path("results/ablation")


def _stats(values: list[float]) -> dict:
    std = statistics.stdev(values) if len(values) > 1 else 0.0  # sample standard deviation
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def aggregate(per_seed: dict[int, dict]) -> dict:
    """``{experiment: {method: {metric | "<metric>_vs_<reference>": {"mean", "std", "n"}}}}`` over seeds.

    Args:
        per_seed: ``{seed: metrics/evaluate.json of that seed}`` (``{experiment: {method: {metric: value}}}``).
    """
    if not per_seed:
        raise ValueError("no seeds to aggregate: run `python -m pipeline.ablation --seeds 0 1 2` first")
    experiments = sorted({name for data in per_seed.values() for name, rows in data.items() if isinstance(rows, dict)})
    table: dict[str, dict] = {}
    for name in experiments:
        methods = sorted({m for data in per_seed.values() for m in data.get(name, {})})
        missing = [seed for seed, data in per_seed.items() if set(data.get(name, {})) != set(methods)]
        if missing:
            raise ValueError(f"experiment {name!r}: seeds {missing} lack some of its methods {methods}: the seed "
                             "files come from different params; run the ablation again")
        rows = {}
        for method in methods:
            cells = {}
            for metric in METRICS:
                values = [data[name][method][metric] for data in per_seed.values() if metric in data[name][method]]
                if len(values) != len(per_seed):
                    continue
                cells[metric] = _stats(values)
                for reference in BASELINES:
                    if method == reference or reference not in methods:
                        continue
                    diffs = [data[name][method][metric] - data[name][reference][metric] for data in per_seed.values()]
                    cells[f"{metric}_vs_{reference}"] = _stats(diffs)
            rows[method] = cells
        table[name] = rows
    return table


def _cell(stat: dict | None, digits: int, signed: bool = False) -> str:
    if stat is None:
        return "-"
    mean = f"{stat['mean']:+.{digits}f}" if signed else f"{stat['mean']:.{digits}f}"
    mark = "" if not signed or abs(stat["mean"]) > stat["std"] else " (n.s.)"
    return f"{mean} ± {stat['std']:.{digits}f}{mark}"


def render(table: dict, seeds: list[int], minutes: dict[int, float] | None = None) -> str:
    """The markdown of ``results/ablation/ablation.md``."""
    lines = [f"# Table 2's ablation over seeds {', '.join(map(str, seeds))} (`python -m pipeline.ablation`)", "",
             ("Mean ± sample standard deviation over the seeds. The differences are paired per seed; "
              "(n.s.): the mean difference is within one standard deviation of zero, no finding."), ""]
    if minutes:
        lines += ["Minutes per seed (dvc repro evaluate): "
                  + ", ".join(f"seed {seed}: {value:.1f}" for seed, value in minutes.items()), ""]
    for name, rows in table.items():
        header = ("| method | PSNR | SSIM | PSNR vs vae_roundtrip | SSIM vs vae_roundtrip | PSNR vs latent_mse "
                  "| PSNR vs input |")
        lines += [f"## {name}", "", header, "|---|---|---|---|---|---|---|"]
        order = [m for m in REFERENCES if m in rows] + [m for m in rows if m not in REFERENCES]
        for method in order:
            cells = rows[method]
            lines.append(f"| {method} | {_cell(cells.get('psnr'), 2)} | {_cell(cells.get('ssim'), 4)} "
                         f"| {_cell(cells.get('psnr_vs_vae_roundtrip'), 2, True)} "
                         f"| {_cell(cells.get('ssim_vs_vae_roundtrip'), 4, True)} "
                         f"| {_cell(cells.get('psnr_vs_latent_mse'), 2, True)} "
                         f"| {_cell(cells.get('psnr_vs_input'), 2, True)} |")
        lines.append("")
    return "\n".join(lines)


def _set_seed(params_path: Path, seed: int) -> None:
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    data = yaml.load(params_path.read_text())
    data["train"]["seed"] = seed
    with params_path.open("w") as handle:
        yaml.dump(data, handle)


def _dvc(*args: str) -> None:
    command = [sys.executable, "-m", "dvc", *args]
    print("+", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)


def _write(table: dict, seeds: list[int], minutes: dict[int, float], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps({"seeds": seeds, "minutes": minutes, "table": table}, indent=2)
                                       + "\n")
    (out / "ablation.md").write_text(render(table, seeds, minutes))


def _read_seeds(out: Path, seeds: list[int]) -> dict[int, dict]:
    missing = [seed for seed in seeds if not (out / f"seed{seed}.json").is_file()]
    if missing:
        raise SystemExit(f"error: {out}/seed{{{','.join(map(str, missing))}}}.json missing: run "
                         "`python -m pipeline.ablation --seeds ...` without --aggregate-only first")
    return {seed: json.loads((out / f"seed{seed}.json").read_text()) for seed in seeds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values (default 0 1 2)")
    parser.add_argument("--params", default="params.yaml", help="the params file dvc.yaml reads (default params.yaml)")
    parser.add_argument("--out", default=str(OUT), help=f"folder of the seed files and the table (default {OUT})")
    parser.add_argument("--aggregate-only", action="store_true", help="rebuild the table from the seed files")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
        parser.error(f"--seeds needs at least two different seeds for a spread, got {args.seeds}")
    out, params_path = Path(args.out), Path(args.params)
    if args.aggregate_only:
        minutes = {}
        if (out / "ablation.json").is_file():
            minutes = {int(k): v for k, v in json.loads((out / "ablation.json").read_text()).get("minutes", {}).items()}
        _write(aggregate(_read_seeds(out, args.seeds)), args.seeds, minutes, out)
        print(f"wrote {out}/ablation.md")
        return 0

    from stages.common import check

    if check.main(["--params", str(params_path)]) not in (0, None):  # every stage's params, before any run
        return 2
    original = params_path.read_bytes()
    out.mkdir(parents=True, exist_ok=True)
    minutes: dict[int, float] = {}
    try:
        for seed in args.seeds:
            _set_seed(params_path, seed)
            started = time.perf_counter()
            _dvc("repro", "evaluate")
            minutes[seed] = round((time.perf_counter() - started) / 60, 2)
            shutil.copyfile("metrics/evaluate.json", out / f"seed{seed}.json")
    finally:
        params_path.write_bytes(original)
    _dvc("repro")  # the params' own seed again: restored from the run cache where it ran before
    _write(aggregate(_read_seeds(out, args.seeds)), args.seeds, minutes, out)
    print(f"wrote {out}/ablation.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
