import io
import logging
import sys

from streamadapt.logs import TEXT_FORMAT, WithoutClientTracebacks


def logged(logger_name: str) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(WithoutClientTracebacks())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        try:
            raise OSError("sslv3 alert bad certificate")
        except OSError:
            logger.error("Error receiving network data closing socket", exc_info=sys.exc_info())
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_kafka_python_connection_errors_are_logged_without_their_traceback():
    text = logged("kafka.net.transport")
    assert "Error receiving network data" in text and "Traceback" not in text


def test_our_own_errors_keep_their_traceback():
    assert "Traceback" in logged("streamadapt.serving.loop")
