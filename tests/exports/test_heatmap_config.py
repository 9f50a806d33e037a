"""The heatmap config section: YAML defaults equal the dataclass, bad values name their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.exports import list_colormaps
from wsi_pipeline.run.config import HeatmapConfig, config_from_dict, load_config


def test_default_yaml_heatmap_block_equals_the_dataclass():
    assert load_config(Path(__file__).parents[2] / "configs" / "default.yaml").heatmap == HeatmapConfig()
    assert HeatmapConfig().colormap in list_colormaps()


@pytest.mark.parametrize("section, key", [
    ({"object_type": "annotation"}, "heatmap.object_type"),
    ({"class_thresholds": [0.9, 0.1]}, "heatmap.class_thresholds"),
    ({"class_thresholds": [0.5]}, "heatmap.class_thresholds"),
    ({"normalize": "zscore"}, "heatmap.normalize"),
    ({"exports": ["png", "svg"]}, "heatmap.exports"),
    ({"smooth_um": -1.0}, "heatmap.smooth_um"),
    ({"top_k": -1}, "heatmap.top_k"),
])
def test_bad_heatmap_values_are_config_errors(section, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict({"heatmap": section})
