"""The precision-scaling study: prepare a corpus, train small models, quantize every checkpoint, fit the law."""
