"""The published claims `isynth claim` re-measures at laptop scale, each with its paper, its arms and its
tests (isynth.claims). Budgets are the main job's (6e12 training FLOPs on digits, the `cpu` preset), so a
claim at 3 seeds finishes in about 20 minutes or less on 2 cores.
"""
from __future__ import annotations

from isynth.claims import Arm, Claim, Test
from isynth.scans import SCANS

B = 6e12  # the main job's training FLOPs per run
_CFG = ("sample.guidance.scale=2.0",)
_INTERVAL = (*_CFG, "sample.guidance.t_min=0.1", "sample.guidance.t_max=0.3")
_UNCOND_CONSTANT = ("method.class_cond=false", "train.lr_schedule=constant", "train.warmup_fraction=0")

CLAIMS: dict[str, Claim] = {c.id: c for c in (
    Claim("C1", "RAR (Yu et al. 2024), Table 2",
          "annealed random-to-raster training beats pure raster and pure random training",
          arms=(Arm("anneal", "rar"), Arm("raster", "rar", ("method.order=scan",)),
                Arm("random", "rar", ("method.order=random",), ("sample.order=random",))),
          tests=(Test("anneal", "raster"), Test("anneal", "random")), budget=B),
    Claim("C2", "RAR (Yu et al. 2024), Fig. 3b",
          "target-aware positions are needed when training in random order",
          arms=(Arm("target-aware", "rar"), Arm("plain", "rar", ("method.target_aware=false",))),
          tests=(Test("target-aware", "plain"), Test("target-aware", "plain", "class_accuracy")), budget=B),
    Claim("C3", "RAR (Yu et al. 2024), Table 3",
          "raster is the best scan order for annealed random-order training to converge to, of six",
          arms=tuple(Arm(s, "rar", (f"method.scan={s}",)) for s in SCANS),
          tests=tuple(Test("raster", s) for s in SCANS[1:]), budget=B),
    Claim("C4", "eMIGM (You et al. 2025), Fig. 3a",
          "the exp mask schedule is best at few sampling steps",
          arms=tuple(Arm(s, "mdm", (f"method.mask_schedule={s}",), ("sample.num_steps=4",))
                     for s in ("exp", "linear", "cosine")),
          tests=(Test("exp", "linear"), Test("exp", "cosine")), budget=B),
    Claim("C5", "eMIGM (You et al. 2025), Fig. 3c",
          "CFG on a time interval keeps quality at fewer network evaluations",
          arms=(Arm("every-step", "mdm", sampling=_CFG), Arm("interval", "mdm", sampling=_INTERVAL)),
          tests=(Test("interval", "every-step", "fd", margin=0.1),
                 Test("interval", "every-step", "sample_flops_per_image")), budget=B),
    Claim("C6", "eMIGM (You et al. 2025), Fig. 2",
          "w(t) = 1 beats ELBO weighting, and the MAE encoder-decoder helps",
          arms=(Arm("w=1", "mdm"), Arm("elbo", "mdm", ("method.weighting=elbo",)),
                Arm("mae", "mdm", ("method.mae=true", "method.decoder_depth=2"))),
          tests=(Test("w=1", "elbo"), Test("mae", "w=1")), budget=B),
    Claim("C7", "Kilian et al. 2024",
          "next-token prediction is cheapest at inference; token-based paradigms follow prompts better than "
          "diffusion at equal training compute",
          arms=(Arm("ar", "ar"), Arm("maskgit", "maskgit"), Arm("mar", "mar"), Arm("diffusion", "diffusion")),
          tests=(*(Test("ar", o, "sample_flops_per_image") for o in ("maskgit", "mar", "diffusion")),
                 Test("ar", "diffusion", "class_accuracy"), Test("maskgit", "diffusion", "class_accuracy")),
          budget=B),
    Claim("C8", "Fluid (Fan et al. 2024)",
          "continuous tokens beat discrete ones on quality; random order beats raster on prompt following",
          arms=(Arm("raster-discrete", "ar"), Arm("raster-continuous", "ar-cont"),
                Arm("random-discrete", "mar", ("tokenizer.kind=grey",)), Arm("random-continuous", "mar")),
          tests=(Test("raster-continuous", "raster-discrete"), Test("random-continuous", "random-discrete"),
                 Test("random-discrete", "raster-discrete", "class_accuracy"),
                 Test("random-continuous", "raster-continuous", "class_accuracy")), budget=B),
    Claim("C9", "GET (Geng et al. 2023), Figs. 1 and 5",
          "one-step GET approaches its teacher, and its quality improves log-linearly with training compute",
          arms=(Arm("teacher", "diffusion"), *(Arm(f"get-{b:.2g}", "get", budget=b) for b in (1.5e12, 3e12, 6e12))),
          tests=(Test("get-6e+12", "teacher", margin=1.0), Test("get-1.5e+12", over=("get-1.5e+12", "get-3e+12",
                                                                                      "get-6e+12"))),
          budget=B),
    # GET states this for an unconditional model trained at a constant learning rate without warm-up: C10
    # measures it so (an unconditional teacher too), C11 with isynth's class-conditional recipe (cosine).
    Claim("C10", "GET (Geng et al. 2023), sec. 5",
          "true noise-image pairs are learnable, shuffled pairs are not (unconditional, constant learning rate)",
          arms=(Arm("true-pairs", "get", _UNCOND_CONSTANT),
                Arm("shuffled-pairs", "get", (*_UNCOND_CONSTANT, "method.shuffle_pairs=true"))),
          tests=(Test("true-pairs", "shuffled-pairs"),), budget=B,
          teacher=("method.class_cond=false", "sample.guidance.scale=1")),
    Claim("C11", "GET (Geng et al. 2023), sec. 5, class-conditional",
          "true noise-image pairs are learnable, shuffled pairs are not (class-conditional, cosine schedule)",
          arms=(Arm("true-pairs", "get"), Arm("shuffled-pairs", "get", ("method.shuffle_pairs=true",))),
          tests=(Test("true-pairs", "shuffled-pairs"),), budget=B),
)}
