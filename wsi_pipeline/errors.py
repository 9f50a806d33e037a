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
