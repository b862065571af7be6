"""The paper's Tables 1-6: their published figures, their shapes, and our results rendered in them.

Figures are transcribed from the paper (``chopgrad-paper.txt``: Tables 1-4 in sections 4.1-4.4,
Tables 5 and 6 in supplement F) as printed, kept as strings so that ``26.70`` stays ``26.70``;
``None`` is the paper's ``-``. Every figure keeps where it comes from (table, row, column): see
:func:`paper_values`. A test checks each one against the paper's text when that file is available.

Which of our experiments stands beside which of the paper's (same kind of experiment, never the same
data or scale: the embedded pipeline runs tiny synthetic scenes and a tiny model):

=============  ===============================  ==============================================
our task       paper table, data set            paper method -> our method
=============  ===============================  ==============================================
sr             Table 1 (its own data set rows)  DOVE -> dove (the DOVE checkpoint run by infer
                                                without fine-tuning, B.1: a method with
                                                iterations_factor 0); ChopGrad -> chopgrad_d1
                                                (the paper does not state D_trunc for SR; 1 is
                                                its default). per_frame is our ablation, shown
                                                under its own name.
nvs            Table 2, DL3DV-Benchmark         ChopGrad D_trunc=0/1/2 -> chopgrad_d0/1/2,
                                                ChopGrad* -> latent_mse, ChopGrad† -> latent_mse_2x
inpaint_box    Tables 3 and 6, DL3DV            ChopGrad (D_trunc 1, sec. 4.3) -> chopgrad_d1
               (centre box of half H and W)
inpaint_rovi   Tables 3 and 6, ROVI             ChopGrad -> chopgrad_d1
inpaint_objects Tables 5 and 6, Waymo-Bbox      ChopGrad -> chopgrad_d1
driving        Table 4, Waymo (reinsertion)     ChopGrad (D_trunc 1, supp. C.4) -> chopgrad_d1;
                                                Mirage -> mirage (the paper profile's method)
=============  ===============================  ==============================================

The LPIPS network: Table 1 follows DOVE's ``eval_metrics.py``, whose ``pyiqa.create_metric("lpips")``
is LPIPS v0.1 on AlexNet, so the paper's LPIPS sits in our ``lpips_alex`` column. The paper does not
name the network for Tables 2-5; those figures are put in the same column (AlexNet is the default of
both lpips and pyiqa), and our ``lpips_vgg`` is shown as an extra column.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass

__all__ = ["LABELS", "METHOD_ORDER", "STAND_IN_MARK", "TABLES", "PaperValue", "TableSpec", "columns_for_task",
           "for_experiments", "paper_datasets", "paper_values", "render"]

STAND_IN_MARK = "‡"  # the paper uses * and † for its own ablation names
METHOD_ORDER = ("input", "vae_roundtrip", "dove", "per_frame", "latent_mse", "latent_mse_2x", "chopgrad_d0", "chopgrad_d1", "chopgrad_d2")

# Column keys -> headers. Our metric names (chopgrad.metrics) plus the derived columns.
LABELS = {
    "psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips_alex": "LPIPS ↓", "lpips_vgg": "LPIPS-VGG ↓", "dists": "DISTS ↓",
    "fid": "FID ↓", "fvd": "FVD ↓", "vbench_overall": "VBench Overall Quality ↑",
    "temporal_flickering": "Temporal Flickering ↑", "aesthetic_quality": "Aesthetic Quality ↑",
    "background_consistency": "Background Consistency ↑", "dynamic_degree": "Dynamic Degree",
    "imaging_quality": "Imaging Quality ↑", "motion_smoothness": "Motion Smoothness ↑",
    "subject_consistency": "Subject Consistency ↑", "inference_seconds_per_frame": "Inference [s/frame] ↓",
    "train_hours": "Train Time [h]",
}

# ---------------------------------------------------------------------------------------------------------
# The published figures, as printed (rows in the paper's order).

# Table 1 (sec. 4.1): rows (data set, metric), one column per method.
TABLE_1_METHODS = ("RealESRGAN [50]", "ResShift [77]", "RealBasicVSR [7]", "Upscale-A-Video [82]",
                   "MGLD-VSR [67]", "VEnhancer [20]", "STAR [65]", "DOVE [12]", "ChopGrad (Ours)")
TABLE_1 = {
    "UDM10": {
        "psnr": ("24.04", "23.65", "24.13", "21.72", "24.23", "21.32", "23.47", "26.48", "26.70"),
        "ssim": ("0.7107", "0.6016", "0.6801", "0.5913", "0.6957", "0.6811", "0.6804", "0.7827", "0.7753"),
        "lpips_alex": ("0.3877", "0.5537", "0.3908", "0.4116", "0.3272", "0.4344", "0.4242", "0.2696", "0.2346"),
        "dists": ("0.2184", "0.2898", "0.2067", "0.2230", "0.1677", "0.2310", "0.2156", "0.1492", "0.1143"),
    },
    "SPMCS": {
        "psnr": ("21.22", "21.68", "22.17", "18.81", "22.39", "18.58", "21.24", "23.11", "23.67"),
        "ssim": ("0.5613", "0.5153", "0.5638", "0.4113", "0.5896", "0.4850", "0.5441", "0.6210", "0.6274"),
        "lpips_alex": ("0.3721", "0.4467", "0.3662", "0.4468", "0.3263", "0.5358", "0.5257", "0.2888", "0.2647"),
        "dists": ("0.2220", "0.2697", "0.2164", "0.2452", "0.1960", "0.2669", "0.2872", "0.1713", "0.1448"),
    },
    "YouHQ40": {
        "psnr": ("22.82", "23.32", "22.39", "19.62", "23.17", "19.78", "22.64", "24.30", "24.58"),
        "ssim": ("0.6337", "0.6273", "0.5895", "0.4824", "0.6194", "0.5911", "0.6323", "0.6740", "0.6760"),
        "lpips_alex": ("0.3571", "0.4211", "0.4091", "0.4268", "0.3608", "0.4742", "0.4600", "0.2997", "0.2581"),
        "dists": ("0.1790", "0.2159", "0.1933", "0.2012", "0.1685", "0.2140", "0.2287", "0.1477", "0.1079"),
    },
    "RealVSR": {
        "psnr": ("20.85", "20.81", "22.12", "20.29", "22.02", "15.75", "17.43", "22.32", "22.43"),
        "ssim": ("0.7105", "0.6277", "0.7163", "0.5945", "0.6774", "0.4002", "0.5215", "0.7301", "0.7193"),
        "lpips_alex": ("0.2016", "0.2312", "0.1870", "0.2671", "0.2182", "0.3784", "0.2943", "0.1851", "0.1934"),
        "dists": ("0.1279", "0.1435", "0.0983", "0.1425", "0.1169", "0.1688", "0.1599", "0.0978", "0.0944"),
    },
    "MVSR4x": {
        "psnr": ("22.47", "21.58", "21.80", "20.42", "22.77", "20.50", "22.42", "22.42", "22.55"),
        "ssim": ("0.7412", "0.6473", "0.7045", "0.6117", "0.7418", "0.7117", "0.7421", "0.7523", "0.7590"),
        "lpips_alex": ("0.4534", "0.5945", "0.4235", "0.4717", "0.3568", "0.4471", "0.4311", "0.3476", "0.3212"),
        "dists": ("0.3021", "0.3351", "0.2498", "0.2673", "0.2245", "0.2800", "0.2714", "0.2363", "0.2071"),
    },
}

# Tables 2-6: one row per (data set, method), columns in the paper's order.
TABLE_2_COLUMNS = ("fid", "psnr", "ssim", "lpips_alex", "dists", "vbench_overall", "temporal_flickering",
                   "inference_seconds_per_frame", "train_hours")
TABLE_2 = {"DL3DV-Benchmark": {  # sec. 4.2; the text spells the second method "MVSpIat-360"
    "Difix [61]": ("16.637", "17.213", "0.561", "0.407", "0.122", "0.766", "0.898", "0.37", "2.0"),
    "MVSplat-360 [11]": ("38.203", "15.502", "0.492", "0.532", "0.231", "0.743", "0.926", "2.89", None),
    "ChopGrad": ("11.209", "19.237", "0.610", "0.342", "0.113", "0.783", "0.921", "1.11", "4.0"),
    "ChopGrad* (latent MSE)": ("48.525", "19.501", "0.588", "0.440", "0.244", "0.753", "0.933", "1.11", "2.3"),
    "ChopGrad† (latent MSE, 2x steps)": ("48.173", "19.401", "0.586", "0.439", "0.238", "0.751", "0.932", "1.11",
                                         "4.5"),
    "ChopGrad D_trunc=0": ("11.775", "19.231", "0.605", "0.345", "0.115", "0.782", "0.920", "1.11", "3.5"),
    "ChopGrad D_trunc=1": ("11.209", "19.237", "0.610", "0.342", "0.113", "0.783", "0.921", "1.11", "4.0"),
    "ChopGrad D_trunc=2": ("11.742", "19.308", "0.609", "0.343", "0.115", "0.782", "0.922", "1.11", "4.5"),
}}
TABLE_3_COLUMNS = ("fid", "fvd", "psnr", "ssim", "lpips_alex", "dists", "vbench_overall")
TABLE_3 = {  # sec. 4.3
    "DL3DV": {"VACE": ("45.060", "574.441", "20.678", "0.757", "0.236", "0.083", "0.792"),
              "ChopGrad": ("40.948", "583.581", "21.699", "0.765", "0.221", "0.077", "0.792")},
    "Waymo": {"VACE": ("34.856", "440.651", "23.229", "0.804", "0.212", "0.079", "0.836"),
              "ChopGrad": ("27.057", "470.545", "25.048", "0.823", "0.192", "0.071", "0.835")},
    "ROVI": {"VACE": ("30.491", "201.610", "22.618", "0.834", "0.223", "0.112", "0.752"),
             "ChopGrad": ("27.547", "188.546", "25.200", "0.859", "0.199", "0.095", "0.747")},
}
TABLE_4_COLUMNS = ("psnr", "ssim", "lpips_alex", "dists", "fid", "fvd")
TABLE_4 = {"Waymo": {  # sec. 4.4
    "Mirage (hires inference)": ("27.30", "0.8912", "0.2067", "0.0740", "10.28", "204.66"),
    "ChopGrad": ("29.49", "0.9031", "0.1719", "0.0561", "5.86", "154.49"),
}}
TABLE_5_COLUMNS = TABLE_3_COLUMNS
TABLE_5 = {"Waymo-Bbox": {  # supplement F
    "VACE": ("12.084", "253.710", "27.661", "0.873", "0.154", "0.061", "0.834"),
    "ChopGrad": ("12.358", "252.599", "28.838", "0.875", "0.146", "0.057", "0.835"),
}}
TABLE_6_COLUMNS = ("aesthetic_quality", "background_consistency", "dynamic_degree", "imaging_quality",
                   "motion_smoothness", "subject_consistency", "temporal_flickering", "vbench_overall")
TABLE_6 = {  # supplement F
    "DL3DV": {"VACE": ("0.531", "0.917", "0.950", "0.731", "0.957", "0.912", "0.912", "0.792"),
              "ChopGrad": ("0.519", "0.912", "0.950", "0.729", "0.961", "0.903", "0.919", "0.792")},
    "Waymo": {"VACE": ("0.512", "0.956", "0.882", "0.716", "0.987", "0.953", "0.969", "0.836"),
              "ChopGrad": ("0.517", "0.960", "0.894", "0.695", "0.988", "0.945", "0.972", "0.835")},
    "Waymo-Bbox": {"VACE": ("0.519", "0.957", "0.859", "0.704", "0.987", "0.950", "0.970", "0.834"),
                   "ChopGrad": ("0.525", "0.962", "0.847", "0.696", "0.988", "0.955", "0.972", "0.835")},
    "ROVI": {"VACE": ("0.472", "0.926", "0.816", "0.538", "0.959", "0.885", "0.941", "0.752"),
             "ChopGrad": ("0.457", "0.924", "0.749", "0.521", "0.964", "0.884", "0.947", "0.747")},
}


@dataclass(frozen=True)
class PaperValue:
    """One published figure and where it is printed."""

    table: int
    dataset: str
    method: str  # the paper's label
    column: str  # our column key (LABELS)
    text: str | None  # as printed; None for "-"

    @property
    def value(self) -> float | None:
        return None if self.text is None else float(self.text)


def _rows_table(number: int, data: dict, columns: tuple[str, ...]) -> list[PaperValue]:
    return [PaperValue(number, dataset, method, column, text)
            for dataset, rows in data.items() for method, texts in rows.items()
            for column, text in zip(columns, texts, strict=True)]


def paper_values() -> list[PaperValue]:
    """Every transcribed figure of Tables 1-6, in the paper's reading order."""
    values = [PaperValue(1, dataset, method, metric, text)
              for dataset, metrics in TABLE_1.items() for metric, texts in metrics.items()
              for method, text in zip(TABLE_1_METHODS, texts, strict=True)]
    for number, data, columns in ((2, TABLE_2, TABLE_2_COLUMNS), (3, TABLE_3, TABLE_3_COLUMNS),
                                  (4, TABLE_4, TABLE_4_COLUMNS), (5, TABLE_5, TABLE_5_COLUMNS),
                                  (6, TABLE_6, TABLE_6_COLUMNS)):
        values += _rows_table(number, data, columns)
    return values


# ---------------------------------------------------------------------------------------------------------
# The shapes


@dataclass(frozen=True)
class TableSpec:
    number: int
    title: str
    layout: str  # "metric_rows": rows (data set, metric), columns methods (Table 1); "rows": rows (data set, method)
    columns: tuple[str, ...]  # metric keys: the paper's, then ours only
    tasks: dict[str, str | None]  # our task -> the paper data set beside it (None: a data set of its own)
    methods: dict[str, str]  # paper method -> our method (same experiment)


_CHOPGRAD = {"ChopGrad": "chopgrad_d1"}
TABLES = {
    1: TableSpec(1, "Video super-resolution (paper Table 1)", "metric_rows",
                 ("psnr", "ssim", "lpips_alex", "dists", "lpips_vgg"), {"sr": None},
                 {"DOVE [12]": "dove", "ChopGrad (Ours)": "chopgrad_d1"}),
    2: TableSpec(2, "Artifact removal in novel view synthesis (paper Table 2)", "rows",
                 TABLE_2_COLUMNS + ("lpips_vgg",), {"nvs": "DL3DV-Benchmark"},
                 {"ChopGrad* (latent MSE)": "latent_mse", "ChopGrad† (latent MSE, 2x steps)": "latent_mse_2x",
                  "ChopGrad D_trunc=0": "chopgrad_d0", "ChopGrad D_trunc=1": "chopgrad_d1",
                  "ChopGrad D_trunc=2": "chopgrad_d2"}),
    3: TableSpec(3, "Video inpainting (paper Table 3)", "rows", TABLE_3_COLUMNS + ("lpips_vgg",),
                 {"inpaint_box": "DL3DV", "inpaint_rovi": "ROVI"}, _CHOPGRAD),
    4: TableSpec(4, "Controlled driving video generation (paper Table 4)", "rows", TABLE_4_COLUMNS + ("lpips_vgg",),
                 {"driving": "Waymo"}, {**_CHOPGRAD, "Mirage (hires inference)": "mirage"}),
    5: TableSpec(5, "Video inpainting, object masks (paper supplement Table 5, Waymo-Bbox)", "rows",
                 TABLE_5_COLUMNS + ("lpips_vgg",), {"inpaint_objects": "Waymo-Bbox"}, _CHOPGRAD),
    6: TableSpec(6, "VBench components for video inpainting (paper supplement Table 6)", "rows", TABLE_6_COLUMNS,
                 {"inpaint_box": "DL3DV", "inpaint_objects": "Waymo-Bbox", "inpaint_rovi": "ROVI"}, _CHOPGRAD),
}


def paper_datasets(task: str) -> set[str]:
    """The paper's data sets a row of ``task`` may stand beside (its tables' data sets)."""
    return {dataset for spec in TABLES.values() if task in spec.tasks for dataset in _PAPER_DATA[spec.number]}


def for_experiments(spec: TableSpec, kinds: dict[str, tuple[str, str | None]]) -> TableSpec:
    """``spec`` with its rows keyed by experiment: ``kinds`` maps each experiment to (its paper task, the
    paper data set it stands beside or None for the task's). An experiment named like its task (the
    embedded default) keeps the row it had."""
    rows = {name: dataset or spec.tasks[task] for name, (task, dataset) in kinds.items() if task in spec.tasks}
    return dataclasses.replace(spec, tasks=rows) if rows else spec  # none: the paper's figures alone, as named


def columns_for_task(task: str) -> set[str] | None:
    """The columns of the tables that show ``task`` (None: no table shows it)."""
    specs = [spec for spec in TABLES.values() if task in spec.tasks]
    return {column for spec in specs for column in spec.columns} if specs else None


_PAPER_DATA = {1: TABLE_1, 2: TABLE_2, 3: TABLE_3, 4: TABLE_4, 5: TABLE_5, 6: TABLE_6}


# ---------------------------------------------------------------------------------------------------------
# Rendering
#
# ``results[task][method][column]`` is a dict: {"value": float, "stand_in": bool} when computed,
# {"value": None, "reason": str} when not; a column absent from the dict was not requested.


def _format(column: str, value: float) -> str:
    if column in ("psnr", "fid", "fvd"):
        return f"{value:.3f}" if column != "psnr" else f"{value:.2f}"
    if column in ("inference_seconds_per_frame", "train_hours"):
        return f"{value:.3g}"
    return f"{value:.4f}"


def _our_cell(cell: dict | None, column: str, csv_mode: bool) -> str:
    if cell is None:
        return "" if csv_mode else "–"
    if cell["value"] is None:
        return "" if csv_mode else "n/c"
    if csv_mode:
        return repr(float(cell["value"]))
    return _format(column, cell["value"]) + (STAND_IN_MARK if cell.get("stand_in") else "")


def _ordered(methods) -> list[str]:
    return [m for m in METHOD_ORDER if m in methods] + sorted(m for m in methods if m not in METHOD_ORDER)


def _paper_cell(text: str | None, csv_mode: bool) -> str:
    return ("" if csv_mode else "–") if text is None else text


def _rows(spec: TableSpec, results: dict, csv_mode: bool) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a (data set, method) table: our rows, each paper counterpart right after."""
    header = ["data set", "method", "source"] + [LABELS[c] for c in spec.columns]
    if csv_mode:
        header = ["dataset", "method", "source", *spec.columns, "stand_in_weights"]
    paper = _PAPER_DATA[spec.number]
    paper_columns = _paper_columns(spec.number)
    ours_for = {ours: theirs for theirs, ours in spec.methods.items()}

    def paper_row(dataset: str, method: str) -> list[str]:
        texts = dict(zip(paper_columns, paper[dataset][method], strict=True))
        cells = [_paper_cell(texts[c], csv_mode) if c in texts else ("" if csv_mode else "–") for c in spec.columns]
        return [dataset, method, f"paper Table {spec.number}", *cells] + ([""] if csv_mode else [])

    rows, shown = [], set()
    for task, dataset in spec.tasks.items():
        if task not in results:
            continue
        for method in _ordered(results[task]):
            values = results[task][method]
            stand_in = [c for c in spec.columns if (values.get(c) or {}).get("stand_in")]
            rows.append([f"{task} (this run)", method, "ours"]
                        + [_our_cell(values.get(c), c, csv_mode) for c in spec.columns]
                        + ([";".join(stand_in)] if csv_mode else []))
            theirs = ours_for.get(method)
            if dataset is not None and theirs is not None and theirs in paper[dataset]:
                rows.append(paper_row(dataset, theirs))
                shown.add((dataset, theirs))
        for theirs in paper.get(dataset, {}):  # the rest of the paper's block for this data set
            if (dataset, theirs) not in shown:
                rows.append(paper_row(dataset, theirs))
                shown.add((dataset, theirs))
    for dataset, methods in paper.items():
        for theirs in methods:
            if (dataset, theirs) not in shown:
                rows.append(paper_row(dataset, theirs))
    return header, rows


def _metric_rows(spec: TableSpec, results: dict, csv_mode: bool) -> tuple[list[str], list[list[str]]]:
    """Table 1's shape: rows (data set, metric); the paper's methods as columns, ours merged in where
    the experiment is the same, our other methods as extra columns."""
    ours = {m for task in spec.tasks if task in results for m in results[task]}
    merged = {theirs: ours_m for theirs, ours_m in spec.methods.items() if ours_m in ours}
    extra = [m for m in _ordered(ours) if m not in merged.values()]
    columns = [(theirs, merged.get(theirs)) for theirs in TABLE_1_METHODS] + [(None, m) for m in extra]
    header = ["data set", "metric"] + [
        f"{theirs} / {mine} (ours)" if theirs and mine else (theirs or f"{mine} (ours)") for theirs, mine in columns]
    if csv_mode:
        header = ["dataset", "metric", *[h for h in header[2:]], "stand_in_weights"]
    rows = []
    for task in spec.tasks:
        if task not in results:
            continue
        for metric in spec.columns:
            cells, stand_in = [], False
            for _, mine in columns:
                cell = results[task].get(mine, {}).get(metric) if mine else None
                stand_in |= bool(cell and cell.get("stand_in"))
                cells.append(_our_cell(cell, metric, csv_mode) if mine else ("" if csv_mode else "–"))
            rows.append([f"{task} (this run)", LABELS[metric] if not csv_mode else metric, *cells]
                        + ([str(stand_in).lower()] if csv_mode else []))
    for dataset, metrics in TABLE_1.items():
        for metric, texts in metrics.items():
            by_method = dict(zip(TABLE_1_METHODS, texts, strict=True))
            cells = [_paper_cell(by_method[theirs], csv_mode) if theirs else ("" if csv_mode else "–")
                     for theirs, _ in columns]
            rows.append([f"{dataset} (paper Table 1)", LABELS[metric] if not csv_mode else metric, *cells]
                        + (["false"] if csv_mode else []))
    return header, rows


def _paper_columns(number: int) -> tuple[str, ...]:
    if number == 1:
        return tuple(next(iter(TABLE_1.values())))
    return {2: TABLE_2_COLUMNS, 3: TABLE_3_COLUMNS, 4: TABLE_4_COLUMNS, 5: TABLE_5_COLUMNS,
            6: TABLE_6_COLUMNS}[number]


def render(spec: TableSpec, results: dict, notes: list[str]) -> tuple[str, str]:
    """The table as (markdown, csv) text; ``notes`` become the markdown footnotes.

    The paper's columns are always shown; our extra columns (LPIPS-VGG) only when computed.
    """
    ours = {column for task in spec.tasks if task in results for row in results[task].values() for column in row}
    columns = tuple(c for c in spec.columns if c in _paper_columns(spec.number) or c in ours)
    spec = dataclasses.replace(spec, columns=columns)
    build = _metric_rows if spec.layout == "metric_rows" else _rows
    header, rows = build(spec, results, csv_mode=False)
    lines = [f"# Table {spec.number}: {spec.title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [""] + [f"- {note}" for note in notes]
    header, rows = build(spec, results, csv_mode=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return "\n".join(lines) + "\n", buffer.getvalue()
