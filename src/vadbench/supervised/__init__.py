"""The supervised track: methods trained with labelled anomalies, evaluated k-fold (`protocol`), reported in their
own leaderboard section, never mixed with the one-class results.

Torch-free on import (config validation imports `params`); `protocol`, `classifier`, `supersimplenet` and `track`
import torch."""
