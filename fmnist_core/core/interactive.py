"""Explorable 2-D embeddings for the HTML book: Bokeh figures with every script inline (the book works offline).

Hovering a point shows its image (a small PNG thumbnail inlined as base64), its true class and, where a model
classified it, the predicted class; clicking a class in the legend hides it. The printed book keeps the static
PNG figures of :mod:`fmnist_core.core.plots`; these figures are for the browser only.
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np

# Bokeh's core library only (no widgets, tables, GL or MathJax bundles): about 1.3 MB of JavaScript per page.
BOKEH_COMPONENTS = ["bokeh"]
# BokehJS fetches MathJax from a CDN when a figure has TeX labels (these maps have none); the book serves its own
# copy at this path beside its top-level pages (fmnist_core.pipeline.offline), so the page names no outside host.
BOKEH_MATHJAX_CDN = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-svg.js"
LOCAL_MATHJAX = "_static/mathjax/tex-svg.js"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
THUMBNAIL_TOOLTIP = """
<div style="display:flex;gap:6px;align-items:center">
  <img src="@thumb" width="56" height="56" style="image-rendering:pixelated;border:1px solid #ccc">
  <div>true: <b>@true_class</b>{predicted}</div>
</div>
"""


def thumbnails(images) -> list[str]:
    """Each image as a ``data:image/png;base64,...`` URI.

    Parameters
    ----------
    images : array-like of uint8, shape (N, H, W), (N, 1, H, W) or (N, 3, H, W)
        Grey or RGB images (channels first, as the datasets store them).

    Returns
    -------
    list of str
        One data URI per image (a 28×28 grey image is about 0.4 kB).
    """
    from PIL import Image
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)
    if images.dtype != np.uint8:
        raise ValueError(f"thumbnails need uint8 images, got {images.dtype}")
    uris = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", optimize=True)
        uris.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
    return uris


def subsample(labels, max_points: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``max_points`` points, drawn class by class (every class keeps its share).

    Parameters
    ----------
    labels : array-like of int, shape (N,)
        Class of each point.
    max_points : int
        The most points to keep; all ``N`` are kept (in order) when ``N <= max_points``.
    seed : int
        Seed of the draw.

    Returns
    -------
    ndarray of int
        Sorted indices into ``labels``.
    """
    labels = np.asarray(labels)
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, got {max_points}")
    if len(labels) <= max_points:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        share = max(1, round(max_points * len(members) / len(labels)))
        keep.append(rng.choice(members, size=min(share, len(members)), replace=False))
    return np.sort(np.concatenate(keep))[:max_points]


def embedding_html(maps: dict, labels, class_names, images, predicted: dict | None = None,
                   max_points: int = 1000, seed: int = 0, size: int = 520) -> str:
    """One interactive figure (a tab per map) as a self-contained HTML fragment.

    Parameters
    ----------
    maps : dict
        Tab title -> 2-D coordinates, shape (N, 2); every map shows the same N points.
    labels : array-like of int, shape (N,)
        True class of each point.
    class_names : sequence of str
        Name of each class.
    images : array-like of uint8, shape (N, ...)
        The image of each point (see :func:`thumbnails`).
    predicted : dict, optional
        Tab title -> predicted class of each point, shape (N,); tabs without one show the true class only.
    max_points : int
        Points shown per map at most (a class-balanced draw, :func:`subsample`); keeps the page small.
    seed : int
        Seed of that draw.
    size : int
        Width and height of each plot in pixels.

    Returns
    -------
    str
        HTML with BokehJS and the figure's data inline: no external script or stylesheet.
    """
    source, shown = _source(maps, labels, class_names, images, predicted or {}, max_points, seed)
    panels = [_panel(title, i, source, class_names, title in (predicted or {}), size)
              for i, title in enumerate(maps)]
    total = len(np.asarray(labels))
    sample = f"all {total:,} points" if shown == total else f"{shown:,} of the {total:,} points (class-balanced sample)"
    caption = (f"Interactive: hover a point to see its image and class; click a class in the legend to hide it; "
               f"drag to pan, scroll to zoom. Shown: {sample}.")
    return _standalone(panels, caption)


def _source(maps, labels, class_names, images, predicted, max_points, seed):
    from bokeh.models import ColumnDataSource
    labels = np.asarray(labels)
    for title, xy in maps.items():
        if np.asarray(xy).shape != (len(labels), 2):
            raise ValueError(f"map {title!r} has shape {np.asarray(xy).shape}, expected ({len(labels)}, 2)")
    idx = subsample(labels, max_points, seed)
    names = np.asarray(class_names, dtype=object)
    data = {"true_class": names[labels[idx]].tolist(), "thumb": thumbnails(np.asarray(images)[idx])}
    for i, (title, xy) in enumerate(maps.items()):
        xy = np.asarray(xy, dtype=float)[idx]
        data[f"x{i}"], data[f"y{i}"] = xy[:, 0].astype(np.float32), xy[:, 1].astype(np.float32)
        if title in predicted:
            data[f"pred{i}"] = names[np.asarray(predicted[title])[idx]].tolist()
    return ColumnDataSource(data), len(idx)


def _panel(title: str, i: int, source, class_names, with_prediction: bool, size: int):
    from bokeh.models import CDSView, GroupFilter, HoverTool
    from bokeh.plotting import figure
    extra = f"<br>predicted: <b>@pred{i}</b>" if with_prediction else ""
    fig = figure(width=size, height=size, title=title, tools="pan,wheel_zoom,box_zoom,reset",
                 active_scroll="wheel_zoom", toolbar_location="above")
    renderers = []
    for c, name in enumerate(class_names):
        view = CDSView(filter=GroupFilter(column_name="true_class", group=str(name)))
        renderers.append(fig.scatter(f"x{i}", f"y{i}", source=source, view=view, size=6, alpha=0.8,
                                     color=PALETTE[c % len(PALETTE)], legend_label=str(name)))
    fig.add_tools(HoverTool(renderers=renderers, tooltips=THUMBNAIL_TOOLTIP.format(predicted=extra)))
    fig.legend.click_policy = "hide"
    fig.legend.label_text_font_size = "8pt"
    fig.add_layout(fig.legend[0], "right")
    fig.xaxis.visible = fig.yaxis.visible = False
    fig.grid.visible = False
    return fig


def _standalone(panels: list, caption: str) -> str:
    from bokeh.embed import components
    from bokeh.models import TabPanel, Tabs
    from bokeh.resources import Resources
    layout = panels[0] if len(panels) == 1 else Tabs(tabs=[TabPanel(child=p, title=p.title.text) for p in panels])
    script, div = components(layout)
    bokeh_js = Resources(mode="inline", components=BOKEH_COMPONENTS).render_js().replace(BOKEH_MATHJAX_CDN,
                                                                                         LOCAL_MATHJAX)
    return (f'<div class="fmnist-interactive">\n<p class="fmnist-interactive-caption">{html.escape(caption)}</p>\n'
            f'{bokeh_js}\n{div}\n{script}\n</div>')
