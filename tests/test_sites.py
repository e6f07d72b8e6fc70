"""Tests of editbench.sites on tiny and full-size (meta-device) diffusers UNets and on a non-diffusers decoder."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from torch import nn

from editbench.errors import EditbenchError
from editbench.sites import CrossAttentionSite, find_cross_attention_sites
from editbench.testing import tiny_unet, unet_config


def expected_site_widths(cfg: dict) -> list[int]:
    """Output widths of every cross-attention layer, derived from the UNet config alone (multiset, any order)."""
    channels = list(cfg["block_out_channels"])
    levels = len(channels)
    tpb = cfg.get("transformer_layers_per_block", 1)
    tpb = list(tpb) if isinstance(tpb, (list, tuple)) else [tpb] * levels
    per_block = cfg["layers_per_block"]
    widths = []
    for i, kind in enumerate(cfg["down_block_types"]):
        if kind.startswith("CrossAttn"):
            widths += [channels[i]] * (per_block * tpb[i])
    widths += [channels[-1]] * tpb[-1]  # UNetMidBlock2DCrossAttn
    for i, kind in enumerate(cfg["up_block_types"]):
        if kind.startswith("CrossAttn"):
            widths += [channels[::-1][i]] * ((per_block + 1) * tpb[::-1][i])
    return widths


def check_unet_sites(unet, cfg):
    sites = find_cross_attention_sites(unet)
    widths = expected_site_widths(cfg)
    assert len(sites) == len(widths)
    assert Counter(s.key_features for s in sites) == Counter(widths)
    assert Counter(s.value_features for s in sites) == Counter(widths)
    assert {s.in_features for s in sites} == {cfg["cross_attention_dim"]}
    modules = dict(unet.named_modules())
    for s in sites:
        assert s.name.endswith(".attn2") and s.key_name == f"{s.name}.to_k" and s.value_name == f"{s.name}.to_v"
        assert modules[s.key_name] is s.key and modules[s.value_name] is s.value
        assert isinstance(s.key, nn.Linear) and isinstance(s.value, nn.Linear)
    return sites


@pytest.mark.parametrize("geometry", ["sd15", "sd21", "sdxl"])
def test_tiny_unets(geometry):
    unet = tiny_unet(geometry)
    sites = check_unet_sites(unet, unet_config(geometry))
    order = [name for name, _ in unet.named_modules() if name.endswith("attn2")]
    assert [s.name for s in sites] == order  # model order
    assert [s.name for s in find_cross_attention_sites(unet)] == order  # deterministic


def test_tiny_sdxl_counts_follow_transformer_layers_per_block():
    # down (1 block x 1 layer x 2 transformers) + mid (2) + up (2 resnets+attn x 2 transformers) = 8
    assert len(find_cross_attention_sites(tiny_unet("sdxl"))) == 8


@pytest.fixture(scope="module")
def full_unets():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return {g: UNet2DConditionModel(**unet_config(g, full=True)) for g in ("sd15", "sd21", "sdxl")}


def test_full_size_sd15(full_unets):
    sites = check_unet_sites(full_unets["sd15"], unet_config("sd15", full=True))
    assert len(sites) == 16
    assert Counter(s.value_features for s in sites) == {320: 5, 640: 5, 1280: 6}
    assert sum(s.value_features for s in sites) == sum(s.key_features for s in sites) == 12480
    assert {s.in_features for s in sites} == {768}
    assert sites[0].name == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


@pytest.mark.parametrize("geometry,count,text_dim", [("sd21", 16, 1024), ("sdxl", 70, 2048)])
def test_full_size_sd21_sdxl(full_unets, geometry, count, text_dim):
    sites = check_unet_sites(full_unets[geometry], unet_config(geometry, full=True))
    assert len(sites) == count and sites[0].in_features == text_dim


def test_unet_text_dim_must_agree_with_config():
    unet = tiny_unet("sd15")
    assert len(find_cross_attention_sites(unet, text_dim=32)) == 4
    with pytest.raises(EditbenchError, match="text_dim=768 disagrees with model.config.cross_attention_dim=32"):
        find_cross_attention_sites(unet, text_dim=768)


def test_unet_skips_attn2_that_reads_the_image():
    unet = tiny_unet("sd15")
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    block.attn2.to_k = nn.Linear(32, 32, bias=False)  # width 32 = text width: still a site
    inner = unet.up_blocks[1].attentions[0].transformer_blocks[0].attn2
    inner.to_k, inner.to_v = nn.Linear(40, 32), nn.Linear(40, 32)  # reads width 40: not text
    names = [s.name for s in find_cross_attention_sites(unet)]
    assert len(names) == 3 and "up_blocks.1.attentions.0.transformer_blocks.0.attn2" not in names


def test_unet_incomplete_or_mismatched_pair():
    unet = tiny_unet("sd15")
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    attn.to_v = nn.Linear(16, 32)
    with pytest.raises(EditbenchError, match="to_k reads width 32 but to_v reads 16"):
        find_cross_attention_sites(unet)
    del attn.to_v
    with pytest.raises(EditbenchError, match="no to_v: incomplete"):
        find_cross_attention_sites(unet)


# ---------------------------------------------------------------------------------------------------------------
# A non-diffusers model: 2-layer transformer decoder with its own names
# ---------------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim: int, ctx_dim: int):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(ctx_dim, dim, bias=False)
        self.v_proj = nn.Linear(ctx_dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x, ctx):
        q, k, v = self.q_proj(x), self.k_proj(ctx), self.v_proj(ctx)
        return self.o_proj(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v)


class Layer(nn.Module):
    def __init__(self, dim: int, ctx_dim: int):
        super().__init__()
        self.self_attn = Attention(dim, dim)
        self.cross = Attention(dim, ctx_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, ctx):
        x = x + self.self_attn(x, x)
        x = x + self.cross(x, ctx)
        return x + self.mlp(x)


class Decoder(nn.Module):
    def __init__(self, dim: int = 24, ctx_dim: int = 10, n_layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(Layer(dim, ctx_dim) for _ in range(n_layers))

    def forward(self, x, ctx):
        for layer in self.layers:
            x = layer(x, ctx)
        return x


def test_decoder_sites_by_glob():
    model = Decoder()
    sites = find_cross_attention_sites(model, key_pattern="cross.k_proj", value_pattern="cross.v_proj")
    assert [s.name for s in sites] == ["layers.0.cross", "layers.1.cross"]
    assert [s.key_name for s in sites] == ["layers.0.cross.k_proj", "layers.1.cross.k_proj"]
    assert [s.value_name for s in sites] == ["layers.0.cross.v_proj", "layers.1.cross.v_proj"]
    assert all(s.key is model.layers[i].cross.k_proj and s.value is model.layers[i].cross.v_proj
               for i, s in enumerate(sites))
    assert {(s.in_features, s.key_features, s.value_features) for s in sites} == {(10, 24, 24)}
    again = find_cross_attention_sites(model, key_pattern="layers.*.cross.k_proj", value_pattern="*cross.v_proj",
                                       text_dim=10)
    assert [s.name for s in again] == [s.name for s in sites]


def test_decoder_sites_by_regex():
    model = Decoder(n_layers=3)
    with pytest.raises(EditbenchError, match=r"incomplete pair: layers\.1\.cross\.v_proj has no key"):
        find_cross_attention_sites(model, key_pattern=re.compile(r"layers\.[02]\.cross\.k_proj"),
                                   value_pattern=re.compile(r"layers\.\d+\.cross\.v_proj"))
    sites = find_cross_attention_sites(model, key_pattern=re.compile(r"layers\.\d+\.cross\.k_proj"),
                                       value_pattern=re.compile(r"layers\.\d+\.cross\.v_proj"))
    assert [s.name for s in sites] == ["layers.0.cross", "layers.1.cross", "layers.2.cross"]
    with pytest.raises(EditbenchError, match="no cross-attention sites"):  # regexes must match the full name
        find_cross_attention_sites(model, key_pattern=re.compile("cross.k_proj"),
                                   value_pattern=re.compile("cross.v_proj"))


def test_site_dataclass_defaults():
    k, v = nn.Linear(4, 3), nn.Linear(4, 5)
    site = CrossAttentionSite("a.attn2", k, v)
    assert (site.key_name, site.value_name) == ("a.attn2.to_k", "a.attn2.to_v")
    assert (site.in_features, site.key_features, site.value_features) == (4, 3, 5)
    with pytest.raises(AttributeError):
        site.name = "b"  # frozen


@pytest.mark.parametrize("kwargs,message", [
    ({}, "not a diffusers UNet2DConditionModel.*pass key_pattern"),
    ({"key_pattern": "cross.k_proj"}, "pass both key_pattern and value_pattern"),
    ({"key_pattern": "nothing.k", "value_pattern": "nothing.v"}, "no cross-attention sites found in Decoder"),
    ({"key_pattern": "", "value_pattern": "cross.v_proj"}, "non-empty glob"),
    ({"key_pattern": 3, "value_pattern": "cross.v_proj"}, "non-empty glob"),
    ({"key_pattern": "cross.k_proj", "value_pattern": "cross.k_proj"}, "both match layers.0.cross.k_proj"),
    ({"key_pattern": "cross.*_proj", "value_pattern": "cross.v_proj"}, "matches both .*under 'layers.0.cross'"),
    ({"key_pattern": "mlp", "value_pattern": "cross"}, "layers.0.mlp is a Sequential, not an nn.Linear"),
    ({"key_pattern": "cross.k_proj", "value_pattern": "self_attn.v_proj"}, "incomplete pair"),
    ({"key_pattern": "*.k_proj", "value_pattern": "*.v_proj"}, r"different widths \[10, 24\].*text_dim"),
    ({"key_pattern": "*.k_proj", "value_pattern": "*.v_proj", "text_dim": 10},
     "self_attn.k_proj reads width 24, not text_dim=10"),
    ({"key_pattern": "cross.k_proj", "value_pattern": "cross.v_proj", "text_dim": 24}, "not text_dim=24"),
    ({"key_pattern": "cross.k_proj", "value_pattern": "cross.v_proj", "text_dim": 0}, "positive int"),
])
def test_decoder_errors(kwargs, message):
    with pytest.raises(EditbenchError, match=message):
        find_cross_attention_sites(Decoder(), **kwargs)


def test_decoder_key_value_width_mismatch():
    model = Decoder()
    model.layers[1].cross.v_proj = nn.Linear(12, 24)
    with pytest.raises(EditbenchError, match="layers.1.cross.k_proj reads width 10 but layers.1.cross.v_proj reads 12"):
        find_cross_attention_sites(model, key_pattern="cross.k_proj", value_pattern="cross.v_proj")


def test_not_a_module():
    with pytest.raises(EditbenchError, match="torch.nn.Module"):
        find_cross_attention_sites({"to_k": 1})
