"""Custom BSA parameters: validation, different q/k chunks, max_blocks, per-key overrides."""

import torch

import _toy_longcat
import bsa_ext
from bsa_ext.integrations import longcat
from bsa_ext.presets import BSAParamError, validate_bsa_params


def main():
    torch.manual_seed(0)
    # Every parameter is checked against SPEC before anything changes.
    for bad in ({"sparsity": 1.0}, {"chunk_3d_shape_q": [4, 4, 3]}, {"block_size": 64}):
        try:
            validate_bsa_params(bad)
        except BSAParamError as exc:
            print("rejected:", exc)
    print("missing keys take the defaults:", validate_bsa_params({"sparsity": 0.9}, fill_defaults=True))

    # Query and key chunks may differ (capacities from {16, 32, 64, 128, 256}); latents need not divide.
    latent = (6, 10, 18)
    S = 6 * 10 * 18
    q, k, v = (torch.randn(1, 2, S, 64) for _ in range(3))
    out = bsa_ext.flash_attn_bsa_3d(q, k, v, latent, latent, sparsity=0.8, chunk_3d_shape_q=(2, 4, 4), chunk_3d_shape_k=(4, 4, 4))
    print("q chunks (2,4,4), k chunks (4,4,4):", tuple(out.shape))

    # max_blocks caps the kept blocks in every mode (bsa_ext extra: reaches LongCat layers through install()).
    idx, cnt = bsa_ext.select_blocks(q, k, latent, latent, (4, 4, 4), (4, 4, 4), None, 0.99, max_blocks=4)
    print("cdf 0.99 capped at 4 blocks: counts in", (int(cnt.min()), int(cnt.max())), "index width", idx.shape[-1])

    # On a model: start from a preset and override single keys.
    longcat.install(modules=["_toy_longcat"])
    model = _toy_longcat.ToyDiT()
    params = longcat.enable_bsa(model, "720p-balanced", sparsity=0.9, chunk_3d_shape_k=[4, 4, 8], max_blocks=8)
    print("in effect:", params)
    with torch.no_grad():
        model(torch.randn(1, 8 * 16 * 16, 128), (8, 16, 16))
    longcat.uninstall()


if __name__ == "__main__":
    main()
