"""The analysis figures (paper figures 3 to 7, and 13) as PNG files, drawn with matplotlib (Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_backbone", "plot_gradient_error", "plot_locality", "plot_resources", "plot_spatial"]


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(*args, **kwargs)


def _save(plt, fig, path: str | Path, title: str | None) -> Path:
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_locality(locality, fit, path, title: str | None = None, fit_start: int = 0) -> Path:
    """Figure 3: influence samples, their mean per distance and the exponential fit, log scale."""
    plt, fig, ax = _figure(figsize=(5.5, 3.8))
    distance, values = (t.numpy() for t in locality.samples())
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, size=distance.shape)
    ax.scatter(distance + jitter, values, s=8, alpha=0.4, label="samples L(i <- j)")
    mean = locality.mean_by_distance().numpy()
    ax.plot(np.arange(len(mean)), mean, "o-", color="black", label="mean")
    if fit is not None:
        grid = np.linspace(fit_start, len(mean) - 1, 100)
        ax.plot(grid, fit.predict(grid), "--", color="red",
                label=f"fit C exp(-alpha D): C={fit.C:.3g}, alpha={fit.alpha:.3g}, R2={fit.r2:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("temporal distance D = i - j (decode steps)")
    ax.set_ylabel("||d x_i / d z_j||_F")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(plt, fig, path, title)


def plot_gradient_error(tables: dict[str, list[dict]], path, title: str | None = None) -> Path:
    """Figure 5: absolute and relative latent-gradient error against d_trunc, one line per loss."""
    plt, fig, (abs_ax, rel_ax) = _figure(1, 2, figsize=(9, 3.6))
    for index, (loss, rows) in enumerate(tables.items()):
        d, colour = [r["d_trunc"] for r in rows], f"C{index}"
        abs_ax.plot(d, [max(r["abs_mean"], 1e-30) for r in rows], "o-", color=colour, label=f"{loss}: per step")
        rel_ax.plot(d, [max(r["rel_mean"], 1e-30) for r in rows], "o-", color=colour, label=f"{loss}: per step")
        rel_ax.plot(d, [max(r["total_rel"], 1e-30) for r in rows], "s--", color=colour, label=f"{loss}: all latents")
    for ax, label in ((abs_ax, "absolute Frobenius error"), (rel_ax, "relative Frobenius error")):
        ax.set_yscale("log")
        ax.set_xlabel("d_trunc")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return _save(plt, fig, path, title)


def plot_backbone(rows: list[dict], path, title: str | None = None) -> Path:
    """Figure 4: normalized MAE and cosine similarity of the averaged parameter gradients."""
    plt, fig, ax = _figure(figsize=(5.5, 3.6))
    d = [r["d_trunc"] for r in rows]
    ax.plot(d, [r["normalized_mae"] for r in rows], "o-", color="tab:red", label="normalized MAE")
    ax.set_xlabel("d_trunc")
    ax.set_ylabel("normalized MAE", color="tab:red")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(d, [r["cosine"] for r in rows], "s-", color="tab:blue", label="cosine similarity")
    twin.set_ylabel("cosine similarity", color="tab:blue")
    twin.set_ylim(min(0.0, min(r["cosine"] for r in rows)) - 0.02, 1.02)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")
    return _save(plt, fig, path, title)


def plot_resources(rows: list[dict], path, title: str | None = None, reference_frames: int | None = None,
                   time_key: str = "seconds") -> Path:
    """Figures 6 and 13: time and saved-tensor memory against d_trunc and against video length.

    ``time_key``: ``"seconds"`` (wall) or ``"cpu_seconds"`` (process CPU time, steadier on a shared CPU).
    """
    plt, fig, axes = _figure(2, 2, figsize=(9, 6.4))
    time_label = "CPU seconds" if time_key == "cpu_seconds" else "seconds"
    reference = reference_frames or max(r["latent_frames"] for r in rows)
    at_ref = sorted((r for r in rows if r["mode"] == "chopgrad" and r["latent_frames"] == reference),
                    key=lambda r: r["d_trunc"])
    full = [r for r in rows if r["mode"] == "full"]
    full_ref = [r for r in full if r["latent_frames"] == reference]
    for ax, key, scale, label in ((axes[0, 0], time_key, 1, f"{time_label} (decode_loss + backward)"),
                                  (axes[0, 1], "saved_peak_bytes", 2**20, "peak saved-for-backward MiB")):
        ax.plot([r["d_trunc"] for r in at_ref], [r[key] / scale for r in at_ref], "o-", label="ChopGrad")
        if full_ref:
            ax.axhline(full_ref[0][key] / scale, ls="--", color="gray", label="full backprop")
        ax.set_xlabel(f"d_trunc ({reference} latent frames)")
        ax.set_ylabel(label)
    for ax, key, scale, label in ((axes[1, 0], time_key, 1, time_label),
                                  (axes[1, 1], "saved_peak_bytes", 2**20, "peak saved-for-backward MiB")):
        series = sorted({r["d_trunc"] for r in rows if r["mode"] == "chopgrad"})
        for d in series + [None]:
            line = sorted((r for r in rows if r["d_trunc"] == d), key=lambda r: r["latent_frames"])
            if len({r["latent_frames"] for r in line}) < 2:
                continue
            ax.plot([r["frames"] for r in line], [r[key] / scale for r in line],
                    "o--" if d is None else "o-", label="full backprop" if d is None else f"d_trunc={d}")
        ax.set_xlabel("video length (pixel frames)")
        ax.set_ylabel(label)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path, title)


def plot_spatial(spatial, path, title: str | None = None) -> Path:
    """Figure 7: the frame from the original latents, the frame with the bottom latents zeroed
    (red line: the boundary), their difference (log colour scale), and the largest change per pixel row."""
    from matplotlib.colors import LogNorm

    plt, fig, axes = _figure(1, 4, figsize=(14, 3.4), gridspec_kw={"width_ratios": [1, 1, 1.2, 1.1]})

    def image(frame):  # [3, H, W] in [-1, 1] -> [H, W, 3] in [0, 1]
        return ((frame.numpy().transpose(1, 2, 0) + 1) / 2).clip(0, 1)

    for ax, frame, name in ((axes[0], spatial.original, "original latents"),
                            (axes[1], spatial.zeroed, "latents below the line zeroed")):
        ax.imshow(image(frame))
        ax.axhline(spatial.boundary_px - 0.5, color="red", lw=1.5)
        ax.set_title(f"{name} (frame {spatial.frame})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    difference = (spatial.original - spatial.zeroed).abs().amax(dim=0).numpy().clip(1e-6)  # [H, W]
    shown = axes[2].imshow(difference, norm=LogNorm(vmin=1e-6, vmax=max(float(difference.max()), 1e-5)), cmap="magma")
    axes[2].axhline(spatial.boundary_px - 0.5, color="red", lw=1.5)
    axes[2].set_title("|difference|, max over channels", fontsize=8)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04)
    axes = [axes[0], axes[1], axes[3]]
    rows = np.arange(len(spatial.row_change))
    axes[2].plot(spatial.row_change.numpy().clip(1e-12), rows)  # exact zeros drawn at 1e-12
    axes[2].set_xscale("log")
    axes[2].set_ylim(len(rows) - 0.5, -0.5)  # row 0 on top, as in the frames
    axes[2].axhline(spatial.boundary_px - 0.5, color="red", lw=1.5, label="boundary")
    axes[2].axvline(spatial.threshold, color="gray", ls="--", label=f"threshold {spatial.threshold:.3g}")
    axes[2].set_xlabel("max |change| in the row (log)")
    axes[2].set_ylabel("pixel row")
    axes[2].set_title(f"reach above boundary: {spatial.reach_px} px (any change: {spatial.reach_any_px} px)",
                      fontsize=8)
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3, which="both")
    return _save(plt, fig, path, title)
