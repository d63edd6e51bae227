"""zo_deepspeed: zeroth-order (MeZO-style) fine-tuning on DeepSpeed ZeRO-3 partitions."""
from .adapters import AdapterConfig, adapt
from .config import ZOConfig
from .engine import StepResult, ZOEngine, causal_lm_loss, initialize, replay
from .trajectory import LogHeader, StepRecord, TrajectoryLog, read_log

__all__ = ["ZOConfig", "AdapterConfig", "adapt", "ZOEngine", "StepResult", "StepRecord", "LogHeader", "TrajectoryLog",
           "initialize", "replay", "read_log", "causal_lm_loss"]
__version__ = "0.1.0"
