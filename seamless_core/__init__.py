"""SEAMLeSS core: field algebra, CloudVolume I/O and the alignment steps, with no Airflow import.

Every step is a plain function over layers, run the same way from the `seamless` CLI on a laptop or
inside a Kubernetes pod launched by an Airflow task.
"""

__version__ = "0.1.0"
