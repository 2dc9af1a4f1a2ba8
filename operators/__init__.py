"""Airflow operators: SeamlessPodOperator (a KubernetesPodOperator preset for GPU node pools) and its
local twin. Both run the same `seamless` step command; see the Airflow issue for their delivery."""
