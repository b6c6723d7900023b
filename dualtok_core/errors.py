"""Errors that name what is wrong with the caller's input, raised before torch sees it."""


class DualtokError(ValueError):
    """Base class: every error dualtok raises on purpose derives from this."""


class ImageInputError(DualtokError):
    """Images of the wrong dtype, shape, channel count or size."""


class TokenInputError(DualtokError):
    """Token ids of the wrong shape, dtype, or outside the codebook."""


class BundleError(DualtokError):
    """A bundle folder or URI that is missing a part, or whose parts disagree."""
