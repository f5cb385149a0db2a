"""`serve --log-format json`: broker.log as one JSON object per line.

Log calls about a connection, consumer, producer, topic or subscription pass its id in `extra`
(`log.info(..., extra={"connection": 513})`); a text line shows them in its message, a JSON line
also as fields of their own, so that `jq 'select(.connection == 513)'` finds every line about
that connection. Thespian's logger process applies this formatter to records pickled over from
every actor, extras included.
"""
import json
import logging
import time

ID_FIELDS = ("connection", "consumer", "producer", "topic", "subscription")


class JsonFormatter(logging.Formatter):
    def format(self, record):
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "pid": record.process, "logger": record.name,
                "message": record.getMessage()}
        for field in ID_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, default=str)
