import dagster as dg

from templar_pipelines.jobs import audit_job

checkpoint_audit_schedule = dg.ScheduleDefinition(name="checkpoint_audit", job=audit_job, cron_schedule="0 * * * *",
                                                  default_status=dg.DefaultScheduleStatus.STOPPED,
                                                  description="Hourly audit of the newest published checkpoint.")
