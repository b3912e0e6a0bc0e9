"""loss.png: every logged point is visible, also when there is only one."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest

from qlora_kit.rundir.metrics import plot_loss


def _pixel_at_point(monkeypatch: pytest.MonkeyPatch, records: list[dict], png: Path, point: tuple[float, float]):
    """The PNG's RGB at the data point ``point`` (the figure's own transform, captured while it is saved)."""
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    original = Figure.savefig

    def capture(self: Figure, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    assert plot_loss(records, png) == png
    ax = saved[0].axes[0]
    x, y = ax.transData.transform(point)
    image = matplotlib.image.imread(png)
    return image[int(round(image.shape[0] - y)), int(round(x))][:3]


@pytest.mark.parametrize("key", ["loss", "eval_loss"])
def test_a_single_logged_point_is_drawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    rgb = _pixel_at_point(monkeypatch, [{"step": 1, key: 2.5}], tmp_path / "loss.png", (1, 2.5))
    assert rgb.max() - rgb.min() > 0.3, f"no coloured mark at the only point (pixel {rgb})"
