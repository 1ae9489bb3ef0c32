"""Task generators and checkers: procedurally generated problems with executable tests."""
