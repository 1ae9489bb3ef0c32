"""The runs dashboard and human preference collection (`lmforge ui`)."""
