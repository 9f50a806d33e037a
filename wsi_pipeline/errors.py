"""Errors a user sees. Each names the thing at fault (slide, row, field) in one line."""


class PipelineError(Exception):
    """Base class: an expected, user-facing failure (bad input, bad config), not a bug."""


class ConfigError(PipelineError):
    """The YAML config or a CLI value is invalid; the message names the key path."""


class ManifestError(PipelineError):
    """The manifest is invalid. `problems` lists one line per problem (row and field named)."""

    def __init__(self, path, problems):
        self.path = str(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"manifest {self.path}: {len(self.problems)} problem(s)\n{lines}")


class SlideError(PipelineError):
    """A slide cannot be opened or read, or lacks what the stage needs (e.g. its mpp)."""

    def __init__(self, slide_id, message):
        self.slide_id = slide_id
        self.message = message
        super().__init__(f"slide {slide_id!r}: {message}")


class UnsafePathError(PipelineError):
    """A path built from a name would leave the run folder (or the name is not a safe one): refused
    before anything is created, written or deleted there."""


class InputsError(PipelineError):
    """A run's inputs (manifest, config, CLI values, model names) are invalid; `problems` lists every
    one, each naming its row and field or its config key, so a user fixes them in one pass."""

    def __init__(self, problems):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid inputs, nothing was run: {len(self.problems)} problem(s)\n{lines}")
