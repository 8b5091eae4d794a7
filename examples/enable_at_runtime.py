"""Enabling BSA at runtime on a LongCat DiT, e.g. for the 720p refinement stage only.

With the real package the same lines read:

    from bsa_ext.integrations import longcat
    longcat.install()                                  # before or after importing longcat_video
    with longcat.bsa_enabled(pipe.dit, "720p-balanced"):
        video = pipe.generate_refine(...)

Here a toy DiT (examples/_toy_longcat.py) stands in for pipe.dit.
"""

import logging

import torch

import _toy_longcat
from bsa_ext.integrations import longcat

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")


def main():
    torch.manual_seed(0)
    # The toy keeps its attention in its own module; real LongCat/FastVideo modules are known to install().
    longcat.install(modules=["_toy_longcat"])
    model = _toy_longcat.ToyDiT().eval()
    print(f"{len(longcat.attention_layers(model))} BSA-capable attention layers")

    base_shape = (4, 8, 16)  # "480p" stage: dense attention
    x = torch.randn(1, 4 * 8 * 16, 128)
    with torch.no_grad():
        model(x, base_shape)
    print("base stage ran dense:", [m.enable_bsa for m in longcat.attention_layers(model)])

    refine_shape = (8, 16, 16)  # "720p" refinement: BSA on for this stage only
    x = torch.randn(1, 8 * 16 * 16, 128)
    with longcat.bsa_enabled(model, "720p-balanced") as params, torch.no_grad():
        print("refinement with", params)
        model(x, refine_shape)
    print("after the stage:", [m.enable_bsa for m in longcat.attention_layers(model)])

    # Or switch it on and off explicitly.
    longcat.enable_bsa(model, "720p-quality")
    longcat.disable_bsa(model)
    longcat.uninstall()


if __name__ == "__main__":
    main()
