"""pipeq: Hugging Face transformers pipelines as asynchronous jobs on Celery workers.

from pipeq import pipeline
classifier = pipeline("sentiment-analysis")
classifier("I've been waiting for a HuggingFace course my whole life.")
"""

from pipeq._client import Client, Job, JobState
from pipeq._config import Deployment, load_deployments
from pipeq._ledger import Depth
from pipeq._pipeline import RemotePipeline, pipeline
from pipeq.errors import (
    BrokerRefusesWrites,
    BrokerUnavailable,
    InvalidRequest,
    ItemsFailed,
    JobCancelled,
    JobError,
    JobExpired,
    JobFailed,
    JobLost,
    JobTimeout,
    ModelLoadError,
    NoLiveWorker,
    Overloaded,
    PipeqError,
    StreamRestarted,
    UnknownDeployment,
    UnknownJob,
)

__version__ = "0.1.0"

__all__ = [
    "BrokerRefusesWrites",
    "BrokerUnavailable",
    "Client",
    "Deployment",
    "Depth",
    "InvalidRequest",
    "ItemsFailed",
    "StreamRestarted",
    "Job",
    "JobCancelled",
    "JobError",
    "JobExpired",
    "JobFailed",
    "JobLost",
    "JobState",
    "JobTimeout",
    "ModelLoadError",
    "NoLiveWorker",
    "Overloaded",
    "PipeqError",
    "RemotePipeline",
    "UnknownDeployment",
    "UnknownJob",
    "load_deployments",
    "pipeline",
]
