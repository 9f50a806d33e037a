"""coords.h5 -> RUN/features/{encoder}/{id}.h5: patches through an encoder (encoders/).

    patches.py     a slide's patches as a torch dataset, read off the encoder's critical path
    extractor.py   one slide's (or volume's) features file, skipped when it is still current
    features_h5.py the features file: features (N, D), coords (N, k) and their attributes
    provenance.py  what a features file was made from, the check every consumer makes
"""
