"""Errors the CLI turns into one line and an exit code (see DESIGN: the CLI contract)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a config, a path, data. One line on stderr, exit 2."""

    exit_code = 2


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss kept going non-finite). One line, exit 1."""

    exit_code = 1


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. Exit 128 + signal number."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum
        where = f"; checkpoint saved to {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted by signal {signum}{where}")


class Terminated(BaseException):
    """SIGTERM arrived where no checkpoint is due (outside the training loop, which handles its
    own). A BaseException like KeyboardInterrupt: no `except Exception` swallows it, and every
    `finally` on the way out still runs, so temp files go. Exit 128 + signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"terminated by signal {signum}")
