"""The graph passes of asam_compile, in pipeline order: normalize, match, rewrite."""

PASS_NAMES = ("normalize", "match", "rewrite")
