"""Detect and explain: detections on image files, drawn boxes, attention maps, convergence plots.

Modules: ``detect`` (image files -> detections.json and pictures; ``python -m detr_jax.detect``),
``attention`` (the last layers' attention maps the model sows when asked), ``draw`` (boxes on
images, attention figures), ``plots`` (loss and AP curves of training runs; ``python -m
detr_jax.plot_runs``).
"""
