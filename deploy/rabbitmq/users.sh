#!/bin/sh
# The users of livepatchd on RabbitMQ and their permissions: the roles of ../livepatchd.acl (Mosquitto).
#   LIVEPATCHD_RMQ_DAEMON_PASSWORD=… LIVEPATCHD_RMQ_OPERATOR_PASSWORD=… LIVEPATCHD_RMQ_OBSERVER_PASSWORD=… sh users.sh
# Topic permissions are regular expressions on amq.topic's routing keys: an MQTT topic with '/' turned into '.'
# ('+' into '*', '#' stays), checked on publish (write) and on subscribe, against the filter (read).
# {client_id} is the connecting client's id: each reads only its own reply topics, as Mosquitto's %c.
set -eu
ctl=${RABBITMQCTL:-rabbitmqctl}
vhost=/
# Every MQTT client needs its own subscription queues (mqtt-subscription-<client id>qos0|1) and amq.topic.
queues='^mqtt-subscription-.*$'
exchange_and_queues='^(amq\.topic|mqtt-subscription-.*)$'

user() {  # name password topic-write topic-read
    $ctl add_user "$1" "$2" >/dev/null 2>&1 || $ctl change_password "$1" "$2"
    $ctl set_permissions -p "$vhost" "$1" "$queues" "$exchange_and_queues" "$exchange_and_queues"
    $ctl set_topic_permissions -p "$vhost" "$1" amq.topic "$3" "$4"
}

HOSTDOCS='livepatch\.v1\.[^.#]+\.(status|state|events|trace)'
# The daemons: take requests (and discovery requests), answer them, publish their documents. A host level would
# match the orchestrator's pseudo host too: a daemon account neither reads its requests nor writes its replies,
# rollout documents, events or service status (the lookahead refuses livepatch.v1._orchestrator.*). RabbitMQ
# checks a subscription's filter, not each message, so a daemon subscribes to its own host's requests: a '*'
# host (which would take the orchestrator's requests too) is refused.
NOT_ORCHESTRATOR='(?!livepatch\.v1\._orchestrator\.)'
user livepatchd "$LIVEPATCHD_RMQ_DAEMON_PASSWORD" \
    "^${NOT_ORCHESTRATOR}(livepatch\.v1\.[^.#*]+\.(reply|reply\.[^.#*]+|status|state|events|trace)|livepatch\.discover\.v1\.reply\.[^.#*]+)\$" \
    "^${NOT_ORCHESTRATOR}(livepatch\.v1\.[^.#*]+\.request(\..+)?|livepatch\.discover\.v1)\$"
# Operators: may send requests and read everything a daemon publishes, and their own replies.
user operator "$LIVEPATCHD_RMQ_OPERATOR_PASSWORD" \
    "^(livepatch\.v1\.[^.#*]+\.request\.[^#*]+|livepatch\.discover\.v1)\$" \
    "^(${HOSTDOCS}|livepatch\.v1\.[^.#]+\.reply|livepatch\.v1\.[^.#]+\.reply\.{client_id}|livepatch\.discover\.v1\.reply\.{client_id})\$"
# Observers (dashboards): read-only; they cannot send requests (asking who is there, discover, is no request).
user observer "$LIVEPATCHD_RMQ_OBSERVER_PASSWORD" \
    "^livepatch\.discover\.v1\$" \
    "^(${HOSTDOCS}|livepatch\.v1\.[^.#]+\.reply\.{client_id}|livepatch\.discover\.v1\.reply\.{client_id})\$"
$ctl delete_user guest >/dev/null 2>&1 || true
