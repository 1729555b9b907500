"""The model families dit_accel knows, by module name: each has ``pipelines/presets/<family>.py`` (its presets) and
``models/tiny/<family>.py`` (its tiny transformers), and both registries import the modules in this order, which
is ``dit-accel info``'s and the hub-word search's (:func:`dit_accel.pipelines.presets.resolve_model_family`: a
family whose hub word is more specific comes before one whose word also matches its ids). Adding a family is adding
its module name here, once."""

from __future__ import annotations

from typing import Tuple

__all__ = ["FAMILIES"]

FAMILIES: Tuple[str, ...] = ("wan", "hunyuan_video", "cogvideox", "mochi", "ltx_video",
                             # image families (before "flux": its hub word matches FLUX.2 ids)
                             "flux3", "qwenimage21",  # models-image-b: before flux2/flux and qwenimage
                             "flux2", "qwenimage", "sd3", "cogview4", "hunyuanimage", "chroma",
                             "hidream", "lumina2", "zimage",  # models-image-b
                             "flux",
                             "cosmos", "allegro", "consisid", "latte", "sana_video", "motif_video")
# Wan/Hunyuan lineage (wan_vace first: its hub word "vace" is more specific than "wan").
FAMILIES = ("wan_vace",) + FAMILIES + ("skyreels_v2", "chronoedit", "hunyuan_video_framepack")
# models-video-c (HunyuanVideo 1.5 first: its hub word is more specific than HunyuanVideo's "hunyuan").
FAMILIES = ("hunyuan_video15",) + FAMILIES + ("kandinsky5", "kandinsky6", "easyanimate", "helios")
# models-video-d (issue 28): Wan Animate and LTX-2 before "wan" and "ltx_video" (more specific hub words).
FAMILIES = ("wan_animate", "ltx2") + FAMILIES + ("minimax_h3",)
# Image DiTs of issue 38 (HunyuanDiT first: its hub word is more specific than HunyuanVideo's "hunyuan");
# Sana and OmniGen are refused with their reasons (their tiny modules hold no transformer).
FAMILIES = ("hunyuandit",) + FAMILIES + ("pixart", "auraflow", "cogview3plus", "bria", "lumina_next", "sana",
                                         "omnigen")
