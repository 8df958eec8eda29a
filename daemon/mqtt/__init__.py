"""The MQTT adapter: aiomqtt <-> the service. The only daemon layer that imports aiomqtt (and amqtt)."""

from daemon.mqtt.bridge import MqttBridge
from daemon.mqtt.connect import BrokerConfig
from daemon.mqtt.embedded import EmbeddedBroker

__all__ = ["BrokerConfig", "EmbeddedBroker", "MqttBridge"]
