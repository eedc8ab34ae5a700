pytest_plugins = ["tests.support.infra", "tests.support.service", "tests.support.served",
                  "tests.support.moto_ecs", "tests.support.sites"]
