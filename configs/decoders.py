"""What each decoder's paper changes in the model and loss settings (its official main.py defaults),
shared by the COCO configs (configs/conditional_coco.py, configs/dab_coco.py) and the synthetic
CPU configs (configs/synthetic.py:conditional, :dab):

- detr: official DETR (softmax classification, class cost 1, CE weight 1);
- conditional (Atten4Vis/ConditionalDETR): sigmoid focal classification, class cost 2, CE weight 2;
- dab (IDEA-Research/DAB-DETR): sigmoid focal classification, class cost 2, CE weight 1, GIoU with
  1e-6 added to its denominators, PReLU activation, no dropout;
- dn_dab (IDEA-Research/DN-DETR, DN-DAB-DETR): DAB-DETR with the label-embedding content queries
  and denoising training (5 groups, label noise 0.2, box noise 0.4; ``detr_jax.denoising``);
- deformable, deformable_refine, deformable_two_stage (fundamentalvision/Deformable-DETR: plain,
  ``--with_box_refine``, ``--with_box_refine --two_stage``): multi-scale deformable attention,
  sigmoid focal classification, class cost 2, CE weight 2, sampling offsets and reference points
  at 0.1 x lr.
"""
RECIPES = {
    "detr": dict(model=dict(decoder="detr", classification="softmax"), loss=dict()),
    "conditional": dict(model=dict(decoder="conditional", classification="sigmoid_focal"),
                        loss=dict(cost_class=2.0, ce_weight=2.0)),
    "dab": dict(model=dict(decoder="dab", classification="sigmoid_focal", activation="prelu", dropout=0.0),
                loss=dict(cost_class=2.0, ce_weight=1.0, giou_eps=1e-6)),
}
RECIPES["dn_dab"] = dict(model=dict(RECIPES["dab"]["model"], label_embedding=True),
                         loss=dict(RECIPES["dab"]["loss"], denoising=dict(groups=5, label_noise=0.2, box_noise=0.4)))
for _name, _options in (("deformable", {}), ("deformable_refine", dict(with_box_refine=True)),
                        ("deformable_two_stage", dict(with_box_refine=True, two_stage=True))):
    RECIPES[_name] = dict(model=dict(dict(decoder="deformable", classification="sigmoid_focal", with_box_refine=False,
                                          two_stage=False), **_options),
                          loss=dict(cost_class=2.0, ce_weight=2.0), optim=dict(lr_linear_proj_mult=0.1))


def recipe_of(arg: str) -> tuple[str, str]:
    """"DECODER_REST" -> (DECODER, REST) for the longest DECODER in RECIPES that ``arg`` starts with
    (("detr", arg) if none): "deformable_refine_tiny" -> ("deformable_refine", "tiny")."""
    names = [name for name in RECIPES if arg == name or arg.startswith(name + "_")]
    if not names:
        return "detr", arg
    name = max(names, key=len)
    return name, arg[len(name) + 1:]


def coco_config(arg: str, decoder: str, schedules: dict, topk: int, file: str):
    """The DETR COCO config (configs/detr_coco.py) of variant MODEL[_EPOCHSep] with ``decoder``'s
    recipe, its paper's 300 queries, global batch 16, ``schedules`` {epochs: lr drop epoch} (the
    default: the first) and PostProcess ``topk``."""
    from configs.detr_coco import get_config as detr_coco_config, parse_variant

    default_epochs = next(iter(schedules))
    model, epochs = parse_variant(arg or "r50", schedules, file, default_epochs=default_epochs)
    config = apply_recipe(detr_coco_config(model), decoder)
    config.model.num_queries = 300
    config.optim.lr_drop_epochs = (schedules[epochs],)
    config.train.update(batch_size=16, num_epochs=float(epochs))
    config.eval.topk = topk
    return config


def apply_recipe(config, decoder: str):
    """config with ``decoder``'s model and loss settings (RECIPES) applied, in place; returns it."""
    if decoder not in RECIPES:
        raise ValueError(f"unknown decoder {decoder!r}; expected one of {', '.join(RECIPES)}")
    for section, fields in RECIPES[decoder].items():
        config[section].update(fields)
    return config
