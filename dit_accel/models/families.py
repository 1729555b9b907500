"""The model families dit_accel knows, by module name: each has ``pipelines/presets/<family>.py`` (its presets) and
``models/tiny/<family>.py`` (its tiny transformers), and both registries import the modules in this order, which
is ``dit-accel info``'s and the hub-word search's (:func:`dit_accel.pipelines.presets.resolve_model_family`: a
family whose hub word is more specific comes before one whose word also matches its ids). Adding a family is adding
its module name here, once."""

from __future__ import annotations

from typing import Tuple

__all__ = ["FAMILIES"]

FAMILIES: Tuple[str, ...] = (
    # First, those whose hub word is more specific than a later family's that also matches their ids: AnyFlow's
    # ids name Wan, HunyuanDiT's and HunyuanVideo 1.5's name Hunyuan, Wan Animate's and VACE's name Wan, LTX-2's
    # name LTX.
    "anyflow", "hunyuandit", "wan_animate", "ltx2", "hunyuan_video15", "wan_vace",
    # video
    "wan", "hunyuan_video", "cogvideox", "mochi", "ltx_video",
    # image (FLUX.3 and Qwen-Image 2.1 before FLUX.2 / FLUX.1 and Qwen-Image; all of them before "flux")
    "flux3", "qwenimage21", "flux2", "qwenimage", "sd3", "cogview4", "hunyuanimage", "chroma", "hidream", "lumina2",
    "zimage", "flux",
    # video
    "cosmos", "allegro", "consisid", "latte", "sana_video", "motif_video", "skyreels_v2", "chronoedit",
    "hunyuan_video_framepack", "kandinsky5", "kandinsky6", "easyanimate", "helios", "minimax_h3",
    "sana_wm",  # SANA-WM and its refiner, refused (before Sana: the SANA-WM ids hold "sana")
    # image (Bria FIBO before Bria 3.x: "briaai/FIBO" holds "bria"); Sana and OmniGen are refused with their
    # reasons (their tiny modules hold no transformer)
    "pixart", "auraflow", "cogview3plus", "bria_fibo", "bria", "lumina_next", "sana", "omnigen", "longcat_image",
    "ovis_image", "krea2", "joyimage", "dit", "glm_image", "ernie_image", "nucleusmoe_image", "prx",
    "bria_fibo2",  # (anywhere: FIBO's and Bria 3.x's hub words skip its ids)
    "ideogram4", "dreamlite",
)
