"""`twistd -ny agent.tac`: the agent with its default options, as `twistd -n agent` builds it."""
from twisted.application.service import Application

from agent.service import Options, makeService

options = Options()
options.parseOptions([])
application = Application("agent")
makeService(options).setServiceParent(application)
