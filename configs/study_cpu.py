"""The CPU convergence study: DETR, DAB-DETR, DN-DAB-DETR (denoising) and Deformable DETR with box
refinement on the synthetic shapes, the CPU demo's budget (configs/synthetic.py: the same backbone,
data, 1,000 backbone pretraining steps and 1,400 training steps of batch 8, evaluated every 200
steps), two seeds each; under an hour on a 2-core CPU:

  python -m detr_jax.study --config=configs/study_cpu.py --workdir=runs/study-cpu
  python -m detr_jax.study --config=configs/study_cpu.py --workdir=runs/study-cpu \
      --config.overrides.train.num_steps=500 --config.seeds='(0,)'     # a smaller study

Writes runs/study-cpu/study.md and plots/{ap,loss}.png (detr_jax/study.py). To change the study,
edit DECODERS (any recipe of configs/decoders.py: detr, conditional, dab, dn_dab, deformable,
deformable_refine, deformable_two_stage). The fastest to converge is the demo's decoder
(configs/synthetic.py DEMO_DECODER).
"""
import ml_collections

DECODERS = ("detr", "dab", "dn_dab", "deformable_refine")  # one group each: configs/synthetic.py:DECODER


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        groups=[dict(name=decoder, config=f"configs/synthetic.py:{decoder}") for decoder in DECODERS],
        seeds=(0, 1),
        fractions=(0.5, 0.75, 0.9),
        overrides=dict(train=dict(num_steps=1400)),
    ))
