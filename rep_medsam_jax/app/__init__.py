"""``rep-medsam app``: a local web page where a person draws boxes and gets masks at once.

:mod:`~rep_medsam_jax.app.server` (Starlette, served by uvicorn on 127.0.0.1) over one
:class:`~rep_medsam_jax.predictor.segmenter.Segmenter`; :mod:`~rep_medsam_jax.app.documents`
holds the open files, their masks and undo; ``static/`` is the whole page (a plain canvas
viewer, no third-party script). See docs/app.md.
"""
