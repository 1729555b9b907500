"""Models: loading a pipeline by name (:mod:`.loading`: embedded tiny models, folders, hub ids)
and the embedded tiny pipelines and transformers (:mod:`.tiny`)."""
